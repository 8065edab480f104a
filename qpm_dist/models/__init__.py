"""qpm_dist.models"""
