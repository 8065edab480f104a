"""qpm_dist.data"""
