"""A pipeline stage's backward split in two, as zero-bubble schedules run it (zb-h1, vhalf).

B (`backward_input`) differentiates the stage's outputs into its inputs only, so the input gradient
can be sent upstream at once; W (`WeightWork.run`) later computes the stage's weight gradients.
Together they give exactly the gradients of one plain backward, and W accumulates them through
autograd (AccumulateGrad), so gradient hooks (post-accumulate hooks, ZeRO's, DeepSpeed's bf16
bookkeeping) see the same thing they see after a plain backward.

How W avoids redoing B: the autograd graph is cut where the weights meet the input's path. Call the
*input side* every node whose result depends on a stage input (reached walking from the inputs
toward the outputs). Walking from a weight toward the outputs, the first input-side nodes met are
its *frontier*: there the weight's gradient joins the input-gradient chain (the matmul of x @ W, the
affine of a norm). B runs the input-gradient chain once (retaining the graph) and keeps the gradient
flowing into each frontier node; W restarts autograd at those nodes with those gradients, computing
only what leads to the weights (the frontier node's weight branch and anything between it and the
weight), never the chain again. Weights whose frontiers overlap form one group, run as one autograd
call; within a group a frontier node that another one also feeds is pinned to its kept gradient
(a pre-hook), so no contribution counts twice. Gradients are bitwise those of a plain backward: each
node computes the same values from the same incoming gradient.

A weight that reaches an output without crossing the input side (a stage whose input needs no
gradient, as the embedding stage's token ids; a weight returned as an output) has no frontier: W
differentiates the outputs into it directly (an ordinary restricted backward; B did nothing for it).
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch.autograd.graph import GradientEdge, Node


def _node_of(t: torch.Tensor) -> Node:
    """The graph node producing t: its grad_fn, or for a leaf its gradient accumulator."""
    if t.grad_fn is not None:
        return t.grad_fn
    # A leaf's accumulator exists only while a graph holds it; a throwaway view reaches it.
    return t.view_as(t).grad_fn.next_functions[0][0]


def _consumers(roots: Iterable[Node]) -> dict[Node, list[Node]]:
    """node -> the nodes that take its result (the graph's edges reversed), over what roots reach."""
    users: dict[Node, list[Node]] = defaultdict(list)
    seen, todo = set(), deque()
    for node in roots:
        if node not in seen:
            seen.add(node)
            todo.append(node)
    while todo:
        node = todo.popleft()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            users[nxt].append(node)
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return users


def _downstream(starts: Iterable[Node], users: dict[Node, list[Node]], stop: set[Node]) -> tuple[set, set]:
    """(visited, hit): the nodes reached from `starts` toward the outputs without entering `stop`,
    and the nodes of `stop` met on the way."""
    visited, hit, todo = set(starts), set(), deque(starts)
    while todo:
        for user in users.get(todo.popleft(), ()):
            if user in stop:
                hit.add(user)
            elif user not in visited:
                visited.add(user)
                todo.append(user)
    return visited, hit


@dataclass
class _Group:
    """Weights whose frontiers overlap, and their frontier nodes with the gradients B kept there."""

    weights: list[torch.Tensor]
    frontier: list[Node]
    kept: list[tuple] = field(default_factory=list)  # per frontier node: the gradients into its outputs


@dataclass
class WeightWork:
    """Everything W needs from B: the frontier gradients per group, the weights without a frontier
    (and the outputs with their gradients, to differentiate into those), and, through the frontier
    nodes, the part of the graph that leads to the weights. Dropping it frees that graph."""

    groups: list[_Group] = field(default_factory=list)
    direct_weights: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    output_grads: list[torch.Tensor] = field(default_factory=list)

    def held_tensors(self) -> list[torch.Tensor]:
        """The gradients B kept for W (outside autograd's saved tensors), for memory accounting."""
        kept = [g for group in self.groups for grads in group.kept for g in grads if g is not None]
        return kept + (self.output_grads if self.direct_weights else [])

    def run(self) -> None:
        """W: accumulate every weight gradient of the stage into .grad. Runs once."""
        if self.direct_weights:
            torch.autograd.backward(self.outputs, self.output_grads, inputs=self.direct_weights, retain_graph=True)
        for group in self.groups:
            edges, grads = [], []
            for node, kept in zip(group.frontier, group.kept, strict=True):
                for index, grad in enumerate(kept):
                    if grad is not None:
                        edges.append(GradientEdge(node, index))
                        grads.append(grad)
            if not edges:
                continue
            pins = []
            if len(group.frontier) > 1:
                # A frontier node fed by another one of the group would add that flow to the gradient
                # it was started with: pin every one to what B saw.
                pins = [node.register_prehook(lambda _incoming, k=kept: k)
                        for node, kept in zip(group.frontier, group.kept, strict=True)]
            try:
                # retain_graph: groups may share nodes on the input side (a weight used on both sides
                # of another's frontier); the graph goes when this object does.
                torch.autograd.backward(edges, grads, inputs=group.weights, retain_graph=True)
            finally:
                for pin in pins:
                    pin.remove()
        self.groups, self.direct_weights, self.outputs, self.output_grads = [], [], [], []


def backward_input(
    outputs: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    weights: Iterable[torch.Tensor],
) -> tuple[list[torch.Tensor | None], WeightWork]:
    """B: the gradients of `inputs` (leaf tensors) given the outputs' gradients, also stored in each
    input's .grad (as a plain backward would; DeepSpeed sends .grad upstream). No weight's .grad
    changes. Returns them and the WeightWork that W runs. Outputs that need no gradient are skipped."""
    pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if o.requires_grad]
    outs, out_grads = [o for o, _ in pairs], [g for _, g in pairs]
    diff_inputs = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if any(t.grad_fn is not None for t in diff_inputs):
        # autograd.grad stops at a non-leaf input without running its node, so a frontier there
        # would keep nothing; a stage's input is a leaf (DeepSpeed's received or loaded buffer).
        raise ValueError("backward_input: every input must be a leaf tensor (t.detach().requires_grad_())")
    if not outs:
        return [None] * len(inputs), WeightWork()
    roots = {_node_of(o) for o in outs}
    users = _consumers(roots)
    weight_nodes = {}
    for w in weights:
        if w.requires_grad:
            node = _node_of(w)
            if node in users or node in roots:  # in this graph
                weight_nodes[node] = w
    input_side, _ = _downstream([_node_of(t) for t in diff_inputs], users, set())

    direct, frontier_of = [], {}
    for node, w in weight_nodes.items():
        visited, hit = _downstream([node], users, input_side)
        if visited & roots:
            direct.append(w)  # it reaches an output off the input side: no frontier (module docstring)
        elif hit:
            frontier_of[node] = hit
    groups = _group(frontier_of, weight_nodes)

    kept: dict[Node, tuple] = {}
    hooks = [f.register_prehook(lambda incoming, f=f: kept.__setitem__(f, incoming))
             for group in groups for f in group.frontier]
    try:
        got = torch.autograd.grad(outs, diff_inputs, out_grads, retain_graph=True, allow_unused=True) \
            if diff_inputs else ()
    finally:
        for hook in hooks:
            hook.remove()
    for group in groups:
        group.kept = [kept.get(f, ()) for f in group.frontier]
    by_id = {id(t): g for t, g in zip(diff_inputs, got, strict=True)}
    result = []
    for t in inputs:
        grad = by_id.get(id(t)) if isinstance(t, torch.Tensor) else None
        if grad is not None:
            t.grad = grad if t.grad is None else t.grad + grad
        result.append(grad)
    work = WeightWork(groups=groups, direct_weights=direct)
    if direct:
        work.outputs, work.output_grads = outs, out_grads
    return result, work


def _group(frontier_of: dict[Node, set[Node]], weight_nodes: dict[Node, torch.Tensor]) -> list[_Group]:
    """Merge weights that share a frontier node (union-find over the frontier nodes)."""
    parent: dict[Node, Node] = {}

    def find(n: Node) -> Node:
        while parent.setdefault(n, n) is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for hit in frontier_of.values():
        first, *rest = hit
        for other in rest:
            parent[find(other)] = find(first)
    groups: dict[Node, _Group] = {}
    for node, hit in frontier_of.items():
        group = groups.setdefault(find(next(iter(hit))), _Group(weights=[], frontier=[]))
        group.weights.append(weight_nodes[node])
    members: dict[Node, set[Node]] = defaultdict(set)
    for hit in frontier_of.values():
        members[find(next(iter(hit)))].update(hit)
    for root, group in groups.items():
        group.frontier = list(members[root])
    return list(groups.values())


# ---- on a DeepSpeed pipeline engine ------------------------------------------------------------

def _floats(value) -> list[torch.Tensor]:
    items = value if isinstance(value, (tuple, list)) else [value]
    return [t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point()]


def engine_input_backward(engine, *, outputs, inputs, output_grads=None, loss=None) -> WeightWork:
    """B of one (microbatch, chunk) on a DeepSpeed engine: sets each input's .grad (what SendGrad
    sends) and returns the WeightWork for W. Either `output_grads` (the received or vocabulary
    gradient of the chunk's outputs, pre-scaled) or `loss` (the plain loss stage's DeepSpeed loss,
    scaled by 1/GAS here as DeepSpeed's backward(loss) would) gives the outputs' gradients.

    No weight's .grad and none of BF16_Optimizer's buffers change, so the bf16 bracket of DeepSpeed's
    backward (clear the bf16 grads, run, add them to the fp32 ones) belongs to W alone. The caller
    keeps DeepSpeed's output hooks from rescaling (is_last_stage() False while this runs)."""
    outs = _floats(outputs)
    engine._running_engine_backward = True  # DeepSpeed's output hooks refuse a backward outside the engine's
    try:
        if loss is not None:
            # The loss part first, freed at once: its gradients into the chunk's outputs (for the plain
            # output layer: into the hidden state and the output weight, which OutputLayer returns).
            scale = torch.full_like(loss, 1.0 / engine.gradient_accumulation_steps())
            got = torch.autograd.grad([loss], outs, [scale], allow_unused=True)
            pairs = [(o, g) for o, g in zip(outs, got, strict=True) if g is not None]
            outs, output_grads = [o for o, _ in pairs], [g for _, g in pairs]
        _, work = backward_input(outs, _floats(output_grads), _floats(inputs), stage_weights(engine))
    finally:
        engine._running_engine_backward = False
    if loss is not None and getattr(engine, "loss", None) is loss:
        # DeepSpeed keeps the newest loss as engine.loss; its graph is retained for W, so that
        # reference would keep the chunk's activations past W (until the next loss replaces it).
        engine.loss = loss.detach()
    if loss is not None and work.direct_weights:
        # The plain loss stage: the output weight's gradient (V x h) is already formed, by the loss
        # part above; held until W it would cost V x h per microbatch in flight. Added now, in the
        # same bf16 bracket W uses (so the later W's bracket still sees only its own gradients).
        engine_weight_backward(engine, WeightWork(direct_weights=work.direct_weights, outputs=work.outputs,
                                                  output_grads=work.output_grads))
        work.direct_weights, work.outputs, work.output_grads = [], [], []
    return work


def run_input_backward(engine, buffer_id, *, grad, loss) -> None:
    """B of the chunk in `buffer_id` on either vocabulary engine: its WeightWork kept for W, its
    outputs dropped (W holds what it needs of the graph). The gradient is pre-scaled (or scaled
    here), so DeepSpeed's output hooks must not add 1/GAS: the engine runs as a middle stage."""
    engine._as_middle = True
    try:
        work = engine_input_backward(engine, outputs=engine.pipe_buffers["outputs"][buffer_id],
                                     inputs=engine.pipe_buffers["inputs"][buffer_id], output_grads=grad, loss=loss)
    finally:
        engine._as_middle = False
    engine._put("weight_work", buffer_id, work)
    engine.pipe_buffers["outputs"][buffer_id] = None


def run_weight_pass(engine, buffer_id) -> None:
    """W of the chunk in `buffer_id`, timed as a pass, as a middle stage (see run_input_backward)."""
    work = engine._take("weight_work", buffer_id)
    engine._as_middle = True
    try:
        engine._timed(engine_weight_backward, engine, work)
    finally:
        engine._as_middle = False


def engine_weight_backward(engine, work: WeightWork) -> None:
    """W of one (microbatch, chunk): the weight gradients, accumulated inside the bf16 bracket that
    DeepSpeed's own backward uses (BF16_Optimizer's bf16 .grad holds one pass's gradients at a time;
    update_hp_grads adds them to the fp32 accumulators, so microbatches still sum)."""
    bf16 = engine.using_bf16_optimizer
    if bf16:
        engine.optimizer.clear_lp_grads()
    engine._running_engine_backward = True
    try:
        work.run()
    finally:
        engine._running_engine_backward = False
    if bf16 and not engine._config.bfloat16_config.immediate_grad_update:
        engine.optimizer.update_hp_grads(clear_lp_grads=False)


def stage_weights(engine) -> list[torch.Tensor]:
    """The module's trainable parameters (those of the chunk's graph are found there)."""
    cached = getattr(engine, "_split_weights", None)
    if cached is None:
        cached = engine._split_weights = [p for p in engine.module.parameters() if p.requires_grad]
    return cached
