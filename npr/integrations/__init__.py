"""Bridges from npr's definitions to other training stacks (optional extras).

``npr.integrations.verl`` runs NPR's method inside verl (``pip install npr[verl]``); see docs/verl.md.
Nothing here is imported by npr itself, so npr works without these extras.
"""
