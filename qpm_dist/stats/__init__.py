"""qpm_dist.stats"""
