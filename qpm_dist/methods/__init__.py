"""qpm_dist.methods"""
