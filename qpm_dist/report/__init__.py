"""qpm_dist.report"""
