"""vlmtrain: config-driven training of InternVL-style vision-language models."""
