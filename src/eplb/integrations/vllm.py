"""vLLM adapter: an EPLB policy class whose classmethod ``rebalance_experts`` runs an eplb policy, and the plug-in
that puts it where vLLM's EPLB (and vllm-ascend's) looks.

vLLM (0.32) calls ``EPLB_POLICIES[eplb_config.policy].rebalance_experts(weight, num_replicas, num_groups, num_nodes,
num_ranks, old_global_expert_indices)`` and only allows the policy ``"default"``. eplb's package declares a
``vllm.general_plugins`` entry point (:func:`register`), which vLLM runs in every process: when the environment
variable ``EPLB_VLLM_POLICY`` names a registered policy, the ``"default"`` entry becomes that policy (options as a
JSON object in ``EPLB_VLLM_POLICY_OPTIONS``), and where vllm-ascend is installed its ``PolicyFactory`` returns
:class:`eplb.integrations.AscendPolicy` for it; unset, nothing changes::

    pip install eplb vllm
    EPLB_VLLM_POLICY=auto vllm serve MODEL --enable-expert-parallel --enable-eplb

The plug-in is inert: this module imports only the standard library and eplb's registry of names, so installing eplb
loads nothing into vLLM's processes (vLLM's CPU platform scans every loaded module, and numba's objects break that
scan). The policy code (numpy, numba, scipy) loads at the first ``rebalance_experts`` call, which also checks the
policy's options.

Without vLLM, ``vllm_policy("swift")`` builds such a class for any registered policy::

    from eplb.integrations import vllm_policy
    SwiftPolicy = vllm_policy("swift")
    phy2log = SwiftPolicy.rebalance_experts(weight, 288, 8, 4, 32, old_global_expert_indices=phy2log)
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os

from eplb import policies
from eplb.errors import PolicyError

__all__ = ["VllmPolicy", "vllm_policy", "register", "POLICY_ENV", "OPTIONS_ENV", "ASCEND_FACTORY"]

log = logging.getLogger(__name__)

#: environment variable naming the eplb policy the plug-in installs for vLLM and vllm-ascend
POLICY_ENV = "EPLB_VLLM_POLICY"
#: environment variable with the policy's options, a JSON object
OPTIONS_ENV = "EPLB_VLLM_POLICY_OPTIONS"
#: the vllm-ascend module whose ``PolicyFactory.generate_policy`` the plug-in replaces
ASCEND_FACTORY = "vllm_ascend.eplb.core.policy.policy_factory"


class VllmPolicy:
    """vLLM-style policy class running the eplb policy named by ``policy_name`` with ``policy_options``.

    Subclass it (or use :func:`vllm_policy`) to pick another policy; this base runs ``default``.
    """

    policy_name: str = "default"
    policy_options: dict = {}

    @classmethod
    def rebalance_experts(cls, weight, num_replicas: int, num_groups: int, num_nodes: int, num_ranks: int,
                          old_global_expert_indices=None):
        """Plan a placement (vLLM 0.32's ``AbstractEplbPolicy.rebalance_experts``).

        Args:
            weight: ``[L, E]`` expert load (numpy or torch, any device).
            num_replicas: P physical slots, a multiple of ``num_ranks``.
            num_groups: G expert groups. When G does not divide E and does not divide over the nodes (so DeepSeek's
                algorithm would ignore groups anyway), one group is used.
            num_nodes: N nodes, dividing ``num_ranks``.
            num_ranks: W ranks in the EP group.
            old_global_expert_indices: ``phy2log`` ``[L, P_old]`` in force, or None. As vLLM passes it: ``-1`` marks
                an empty slot (new ranks after a scale-up), and after an elastic scale-down ``P_old`` is wider than
                ``num_replicas`` (the first ``num_replicas`` slots are the surviving ranks'). The plan starts from
                it, and an expert that stays on a rank keeps its slot there (no copy within a rank).

        Returns:
            ``phy2log`` int64 ``[L, num_replicas]``: a torch tensor on ``weight``'s device when ``weight`` is one.

        Raises:
            EplbError: sizes that do not fit or disagree (naming vLLM's argument), bad load, unknown policy or option.
        """
        from eplb.integrations.vllm_plan import plan_phy2log  # the policy code loads here, not with the plug-in

        return plan_phy2log(cls.policy_name, cls.policy_options, weight, num_replicas, num_groups, num_nodes,
                            num_ranks, old_global_expert_indices)


def _policy_class(name: str, options: dict, *bases: type) -> type[VllmPolicy]:
    """A :class:`VllmPolicy` subclass for the registered policy ``name``, named and located as eplb's."""
    class_name = f"Eplb{name.capitalize()}Policy"
    # type() would take the module of the metaclass's caller (vLLM's base is an ABC: "abc.EplbAutoPolicy")
    return type(class_name, (VllmPolicy, *bases),
                {"policy_name": name, "policy_options": dict(options), "__module__": __name__,
                 "__qualname__": class_name, "__doc__": f"vLLM EPLB policy class running eplb's {name!r} policy."})


def vllm_policy(name: str | int = "default", **options) -> type[VllmPolicy]:
    """A :class:`VllmPolicy` subclass running policy ``name`` (registry name or vllm-ascend id) with ``options``.

    Raises:
        PolicyError: unknown policy or option (checked here, not at the first rebalance).
    """
    return _policy_class(policies.get_policy(name, **options).name, options)


def _asked() -> tuple[str, dict] | None:
    """The policy name and options the environment asks for; None when ``EPLB_VLLM_POLICY`` is unset or empty."""
    raw = os.environ.get(POLICY_ENV, "").strip()
    if not raw:
        return None
    try:
        name = policies.policy_name(raw)
    except PolicyError as exc:
        raise PolicyError(f"{POLICY_ENV}={raw!r}: {exc}") from None
    text = os.environ.get(OPTIONS_ENV, "").strip() or "{}"
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PolicyError(f"{OPTIONS_ENV}={text!r} is not JSON: {exc.msg}") from None
    if not isinstance(options, dict):
        raise PolicyError(f"{OPTIONS_ENV} must be a JSON object of policy options, got {text!r}")
    return name, options


def register() -> None:
    """vLLM's ``vllm.general_plugins`` entry point. When ``EPLB_VLLM_POLICY`` names a policy: vLLM's
    ``EPLB_POLICIES["default"]`` (the entry vLLM's EPLB calls) runs it, and so does vllm-ascend's
    ``PolicyFactory.generate_policy`` where vllm-ascend is installed. Does nothing when the variable is unset or empty.

    Raises:
        PolicyError: an unknown policy, or options that are not a JSON object (vLLM stops with it). The option names
            are checked when the policy first plans (or, in vllm-ascend, when its EPLB worker is built).
    """
    asked = _asked()
    if asked is None:
        return
    name, options = asked
    if importlib.util.find_spec("vllm") is not None:
        from vllm.distributed.eplb import policy as vllm_policies

        vllm_policies.EPLB_POLICIES["default"] = _policy_class(name, options, vllm_policies.AbstractEplbPolicy)
        log.info("eplb: vLLM's EPLB policy 'default' now runs eplb's %r policy with options %s", name, options)
    if importlib.util.find_spec("vllm_ascend") is not None:
        _install_in_vllm_ascend(name, options)


def _install_in_vllm_ascend(name: str, options: dict) -> None:
    """Make vllm-ascend's ``PolicyFactory.generate_policy(policy_type)`` return ``AscendPolicy(name, **options)``,
    whatever ``policy_type`` its config gives (its EPLB worker pickles the policy into a process of its own)."""
    try:
        factory = importlib.import_module(ASCEND_FACTORY).PolicyFactory
    except (ImportError, AttributeError) as exc:
        raise PolicyError(f"{POLICY_ENV}={name!r}: vllm_ascend is installed, but its policy factory "
                          f"{ASCEND_FACTORY}.PolicyFactory does not load: {exc}") from exc

    def generate_policy(policy_type: int):
        from eplb.integrations.vllm_ascend import AscendPolicy

        log.info("eplb: vllm-ascend's EPLB runs eplb's %r policy with options %s (in place of its policy_type=%s)",
                 name, options, policy_type)
        return AscendPolicy(name, **options)

    factory.generate_policy = staticmethod(generate_policy)
    log.info("eplb: vllm-ascend's PolicyFactory now returns eplb's %r policy", name)
