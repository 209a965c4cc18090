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

import time
from collections.abc import Mapping
from typing import Any

import pulumi

from k3scluster.errors import K3sClusterError

# The file backend keeps the checkpoint in <stack>.json, written through a rename, and its
# sidecar <stack>.json.attrs, which gocloud.dev's fileblob writes in place (os.Create, then the
# JSON: setAttrs); every read opens the sidecar too (getAttrs). The engine saves a checkpoint
# while the program runs (the Stack resource's step at the start of `up`), so a read at that
# moment decodes an empty sidecar and fails with "failed to load checkpoint: EOF". Such a read
# is asked again; one that keeps failing stops the program (never an empty state: the plan
# would then take a running cluster for a new one).
CHECKPOINT_RACE = "failed to load checkpoint"
READ_TRIES = 10
READ_PAUSE = 0.2


def stack_name(organization: str | None, project: str, stack: str) -> str:
    """This stack's fully qualified name (the file backend's organization is
    ``organization``; Pulumi's mocks have none)."""
    return f"{organization or 'organization'}/{project}/{stack}"


def read_stack_resources(stack: str) -> list[tuple[str, str, Mapping[str, Any]]]:
    """(urn, type, outputs) of every resource of the stack's last checkpoint ([] for a new
    stack). ``stack`` is ``<organization>/<project>/<stack>``."""
    for attempt in range(1, READ_TRIES + 1):
        try:
            result = pulumi.runtime.invoke(
                "pulumi:pulumi:readStackResourceOutputs", {"stackName": stack}
            )
            break
        except Exception as err:  # the SDK raises a plain Exception naming the engine's error
            if CHECKPOINT_RACE not in str(err):
                raise
            if attempt == READ_TRIES:
                raise K3sClusterError(
                    f"cannot read this stack's state ({stack}) after {READ_TRIES} tries: {err}",
                    hint="run `pulumi up` again; if it keeps failing, check the state with "
                    "`pulumi stack export`",
                ) from None
            time.sleep(READ_PAUSE * attempt)
    value = result.value if result is not None else None
    outputs = value.get("outputs") if isinstance(value, Mapping) else None
    if not isinstance(outputs, Mapping):
        return []
    return [
        (str(urn), str(res.get("type") or ""), res.get("outputs") or {})
        for urn, res in outputs.items()
        if isinstance(res, Mapping)
    ]
