"""deqbench attacks: gradient surrogates for DEQs and the attacks that use them.

This package currently holds the ready-made l_inf PGD and the early-state selection protocol;
the (i, Ka, lambda) surrogates, AutoAttack wiring and transfer matrices build on it.
"""
from .pgd import PGDResult, check_linf_ball, pgd_linf, select_early_state

__all__ = ["PGDResult", "check_linf_ball", "pgd_linf", "select_early_state"]
