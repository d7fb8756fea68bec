"""The parts of bench/soak.py: the daemon it runs (daemon), the registry proxy it can take down
(proxy), the fault injector (faults), the recorders and watchers (stats), the end-of-run proofs
(check)."""
