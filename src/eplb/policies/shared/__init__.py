"""What every policy uses and no policy is: the packing kernels (:mod:`~eplb.policies.shared.packing`), the
failure planning applied around any policy (:mod:`~eplb.policies.shared.resilience`) and the slot retention that
keeps experts where they are (:mod:`~eplb.policies.shared.retention`)."""
