"""The lab: local rounds, the Trojan farm, evaluation, scoring and baselines.

Nothing here runs in the container's ``configure`` or ``mitigate``; the product is the
rest of ``telelora``.
"""
