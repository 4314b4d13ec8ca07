"""The recipe's data filtering (InternVL 2.5 report, "Data filtering"): heuristic rules, repetition
detection and LLM quality scoring over any data config, as ``python -m vlmtrain.filter``.

- ``text``: word tokens (CJK one per character), n-gram repetition, sentences and lines;
- ``rules``: the rule protocol and the text rules; ``media``: image and video rules, duplicates;
- ``llm``: LLM quality and repetition scoring with a resumable cache;
- ``pipeline``: one slice of the data through the rules, and the merge that writes kept/rejected;
- ``records``: a record's source object; ``report``: report.md with plots;
- ``defects``: demo data with injected defects and clean look-alikes, for measuring the rules.
"""
