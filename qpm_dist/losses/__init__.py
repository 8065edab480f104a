"""qpm_dist.losses"""
