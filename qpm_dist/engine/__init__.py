"""qpm_dist.engine"""
