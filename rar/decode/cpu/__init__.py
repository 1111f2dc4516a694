"""CPU kernels of a decode step: `capability` (what this CPU and torch run, and which kernel a row
count gets), `linear` (`DecodeLinear`), the two compiled kernels (`linear_kernel`,
`attention_kernel`), which `rar.core.toolchain` builds from `csrc/`."""
