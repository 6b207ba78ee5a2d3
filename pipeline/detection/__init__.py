"""Detectors: the deployable core HALP prunes (:mod:`.core`), their training task and mAP
(:mod:`.task`), and data (:mod:`.data`, :mod:`.scenes`)."""
