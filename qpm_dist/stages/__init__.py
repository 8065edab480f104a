"""Stages: the stage runner (content-keyed, cached outputs) and the generic stages every method reuses.

runner       RunContext, the Stage protocol, stage keys and `run_stages`
artifacts    the files stages hand to each other, written on rank 0 and read on rank 0 then broadcast
train        a training phase with a training task (`TrainStage`) and the shared `DenseStage`
train_pass   the streamed pass of a model over the training (and test) set with pluggable accumulators
evaluate     accuracy and interpretability metrics of a method's final model (and its baseline)
report       the HTML report of a method's final model, with the comparison of every method

Stage bodies hold no barrier and no rank test: what runs on rank 0 only goes through `artifacts`.
"""
