"""ProtoPNet (Chen et al., NeurIPS 2019) as PixPNet's baseline: the model family of methods.pixpnet under the
settings the PixPNet reference gives ProtoPNet (specs/pixpnet.md §1.1–§2.2), scored by the same evaluation.

    protopnet_train -> protopnet_evaluate -> protopnet_report

The stages are PixPNet's (methods.pixpnet.method_stages) under this method's names and read the same `pixpnet`
config section; what makes the model ProtoPNet is its config (configs/demo_protopnet.yaml):

* the prototypes compare with the backbone's LAST layer (`pixpnet.layer: null`), not a shallower cut, so their
  receptive fields are large (at the demo's 48 px the tiny ResNet's layer3 cells see up to the whole image);
* the `linear` read-out (bias-free P -> C, +1 own class / -0.5 other classes at init), trained jointly with its
  L1 term (the reference's last-layer phase after each push is skipped, as in methods.pixpnet: B2/B3);
* cross-entropy + 0.8 cluster + 0.08 separation (the reference's ProtoPNet defaults; PixPNet trains with CE only).

Its headline mapping is ProtoPNet's own, the upsampling of the similarity map (`*_upsample`): the localisation
ProtoPNet reports. The evaluation scores every mapping for both methods, so the comparison shows what PixPNet's
receptive-field mapping gives on ProtoPNet's model as well, and the two effects separate: the mapping (same model,
RF vs upsampling) and the layer (PixPNet's shallow cut vs ProtoPNet's last layer).
"""

from __future__ import annotations

from qpm_dist.config import Config, ConfigError
from qpm_dist.methods import MethodSpec, pixpnet, pixpnet_eval, register
from qpm_dist.methods.pixpnet import PixPNetConfig, method_stages
from qpm_dist.methods.pixpnet_eval import pixpnet_report_sections
from qpm_dist.models.protonet import PrototypeHead

# PixPNet's headline with ProtoPNet's own mapping (upsampling) in place of the receptive-field one
HEADLINE = tuple(key.replace("_ours", "_upsample") for key in pixpnet_eval.HEADLINE)


def validate(cfg: Config) -> None:
    """PixPNet's checks, and the read-out: PixPNet's parameter-free `proto` sum is not ProtoPNet's (the section's
    default is PixPNet's, so a ProtoPNet config must say so)."""
    pixpnet.validate(cfg)
    if cfg.pixpnet.readout != "linear":
        raise ConfigError(f"pixpnet.readout: method protopnet has ProtoPNet's linear read-out, got "
                          f"{cfg.pixpnet.readout!r}; set pixpnet.readout=linear (configs/demo_protopnet.yaml has "
                          f"ProtoPNet's settings) or run method pixpnet")


SPEC = register(MethodSpec(
    name="protopnet", label="ProtoPNet", sections={"pixpnet": PixPNetConfig}, stages=method_stages("protopnet"),
    head=PrototypeHead, validate=validate, order=55, headline=HEADLINE, report_sections=pixpnet_report_sections,
    demo_config="demo_protopnet.yaml", units="prototypes",
))
