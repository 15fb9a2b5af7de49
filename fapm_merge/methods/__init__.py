"""mergekit merge methods backed by the FAPM core, registered once, here.

* ``fapm`` and ``fapm_ties``: :mod:`~fapm_merge.methods.task_arithmetic` (one frozen
  class, two instances);
* ``fapm_lora``: :mod:`~fapm_merge.methods.lora` (FAPM straight from a PEFT adapter);
* shared parameter specs and validators: :mod:`~fapm_merge.methods.common`;
* every use of mergekit's private API: :mod:`~fapm_merge.methods.compat`.

Importing this package registers the methods with mergekit (idempotently); the
start-up hook does it the moment ``mergekit.merge_methods`` is imported, so the
unmodified ``mergekit-yaml`` knows ``merge_method: fapm``. A new merge method is a
module here plus one line in :data:`METHODS`.
"""

from __future__ import annotations

import threading

from mergekit.merge_methods import registry

from fapm_merge.methods.lora import fapm_lora_method
from fapm_merge.methods.task_arithmetic import fapm_method, fapm_ties_method

METHODS = (fapm_method, fapm_ties_method, fapm_lora_method)
"""Every method fapm-merge adds to mergekit."""

_lock = threading.Lock()


def register_methods() -> None:
    """Make every fapm-merge method known to mergekit by name; safe to call again."""
    with _lock:
        known = {method.spec.name for method in registry.registered_methods()}
        for method in METHODS:
            if method.spec.name not in known:
                registry.register(method)


register_methods()

__all__ = ["METHODS", "fapm_lora_method", "fapm_method", "fapm_ties_method", "register_methods"]
