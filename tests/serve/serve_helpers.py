"""Inputs shared by the demo-server tests."""

# A passage and question whose answer is unambiguous for the teacher.
CONTEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
           "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.")
QUESTION = "Who is the tower named after?"
PROMPT = "What is the capital of France?"
GEN_TOKENS = 6  # greedy, so every path (direct, SSE, JSON, browser) must give the same text
