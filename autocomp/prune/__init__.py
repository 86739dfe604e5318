"""Compress an existing model: dependency-aware channel pruning (Torch-Pruning's dependency
graph), per-layer int8/fp32 bits, and the policy space the search explores over both."""

#: Each channel group's choices. Eighths, not quarters: with quarters a budget between two
#: uniform ratios could only be met by mixing 1/4-3/4 groups, and on digits_hard (resnet18,
#: mobilenetv3 at half their fp32 latency) such mixes finetuned 1-7 points below uniform
#: Torch-Pruning at the ratio that just fits (experiments/compress_peers.py).
KEEP_RATIOS = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)

#: SGD steps (distilling from the original) each policy takes before it is scored. After
#: BatchNorm recalibration alone, mobilenetv3 pruned to ~0.6 of its channels scored 14-24% on
#: digits_hard (10 classes): the search was ranking noise. A few steps show what a policy
#: recovers, as NetAdapt's short-term finetune does.
TUNE_BATCHES = 20
