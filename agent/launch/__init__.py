"""Starting jobs with what was learned (`launcher`: `dynamiccl launch`) and checking a node before
(`doctor`: `dynamiccl doctor`, with its one-rank NCCL probe `nccl_probe`)."""
