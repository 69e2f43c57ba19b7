"""shardfn.npu: torch_npu's fused ops with portable references (placeholder re-exports)."""
