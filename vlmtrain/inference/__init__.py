"""A trained model answering prompts: the generation engine (``engine``), held-out evaluation
(``evaluation``, what ``vlmtrain eval`` runs) and the chat console (``chat``)."""
