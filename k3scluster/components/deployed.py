"""What this stack deployed before the run: read from the stack's own state by the program.

``read_stack_resources(stack)`` asks the engine for the outputs of every resource of the
stack's last checkpoint (the builtin ``pulumi:pulumi:readStackResourceOutputs``, which
``StackReference`` uses too; synchronous, during preview and up alike, and empty for a new
stack). ``k3scluster.records`` reads them (each deploy step's recorded inputs, the K3s
releases each host runs). The state is the stack's own: nothing depends on where the checkout
lives. A step's state is written when the step succeeds, so a run that failed half way still
records each host it deployed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pulumi


def stack_name(organization: str | None, project: str, stack: str) -> str:
    """This stack's fully qualified name (the file backend's organization is
    ``organization``; Pulumi's mocks have none)."""
    return f"{organization or 'organization'}/{project}/{stack}"


def read_stack_resources(stack: str) -> list[tuple[str, str, Mapping[str, Any]]]:
    """(urn, type, outputs) of every resource of the stack's last checkpoint ([] for a new
    stack). ``stack`` is ``<organization>/<project>/<stack>``."""
    result = pulumi.runtime.invoke("pulumi:pulumi:readStackResourceOutputs", {"stackName": stack})
    value = result.value if result is not None else None
    outputs = value.get("outputs") if isinstance(value, Mapping) else None
    if not isinstance(outputs, Mapping):
        return []
    return [
        (str(urn), str(res.get("type") or ""), res.get("outputs") or {})
        for urn, res in outputs.items()
        if isinstance(res, Mapping)
    ]
