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
    def __init__(self, name, opts=None):
        super().__init__(NoOp(), name, {"value": name}, opts)


class Box(pulumi.ComponentResource):
    def __init__(self, name, opts=None):
        super().__init__("floor:index:Box", name, None, opts)
        self.register_outputs({})


config = pulumi.Config("floor")
root = Box("root")
child = pulumi.ResourceOptions(parent=root)
for i in range(config.require_int("components") - 1):
    Box(f"box-{i}", child)
for i in range(config.require_int("steps")):
    Step(f"step-{i}", child)
