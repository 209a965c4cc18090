"""The engine floor of the preview benchmark (bench/run.py): the same number and kinds of
resources as k3scluster's preview of a cluster, and nothing else.

Config ``floor:components`` plain ComponentResources (one root, the rest its children) and
``floor:steps`` dynamic-provider resources with trivial inputs (no-op provider). Dynamic
resources are used for the steps, as in k3scluster's ``python`` runner, because they cost the
engine more than components: each one is a Check/Diff call to the dynamic provider process and
carries the pickled provider in its inputs.
"""

import pulumi
from pulumi.dynamic import CreateResult, DiffResult, Resource, ResourceProvider


class NoOp(ResourceProvider):
    def create(self, props):
        return CreateResult(id_="noop", outs=props)

    def diff(self, _id, olds, news):
        return DiffResult(changes=olds != news)


class Step(Resource):
    def __init__(self, name, props=None, opts=None):
        super().__init__(NoOp(), name, props or {"value": name}, opts)


def step_props(name, inputs):
    """Properties shaped like a k3scluster deploy step's: argv lists and ``inputs`` digests."""
    argv = ["colmena", "apply", "switch", "--on", name, "-f", "/render/hive.nix", "-p", "4"]
    return {
        "host": name,
        "create": argv,
        "delete": ["echo", f"k3scluster: {name} left the plans; the machine was NOT wiped"],
        "dir": "/project",
        "inputs": {f"input:{name}:{i}": "0" * 12 for i in range(inputs)},  # short, as ours
        "stdout": None,
        "stderr": None,
    }


class Box(pulumi.ComponentResource):
    def __init__(self, name, opts=None):
        super().__init__("floor:index:Box", name, None, opts)
        self.register_outputs({})


config = pulumi.Config("floor")
root = Box("root")
child = pulumi.ResourceOptions(parent=root)
for i in range(config.require_int("components") - 1):
    Box(f"box-{i}", child)
# floor:stepInputs > 0: steps carry k3scluster-shaped properties with that many digests (the
# "floor with our step properties" column of the benchmark: what carrying the digests costs)
inputs = config.get_int("stepInputs") or 0
for i in range(config.require_int("steps")):
    name = f"step-{i}"
    Step(name, step_props(name, inputs) if inputs else None, child)
