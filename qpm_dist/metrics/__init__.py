"""qpm_dist.metrics"""
