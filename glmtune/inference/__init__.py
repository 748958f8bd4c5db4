"""Using a model: chat, prediction, merging and serving's engine, and the inference scripts' shared main.

engine     ChatEngine: prompt template, generate(), stop strings, streaming
artifacts  loading a base model or what a training run saved (its hyperparameters.yaml says how)
chat       the terminal chat (history, clear, exit, streaming)
predict    answering every turn of a data file, scored
metrics    ROUGE-1/2/L and BLEU-4 as ChatGLM's published scripts compute them
merge      folding a PEFT adapter into its base weights
cli        the inference scripts' flags and main(), and how a script ends on a user's mistake
"""
