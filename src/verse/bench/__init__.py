"""`verse bench ...`: Verse measured side by side with a reference implementation in one run.

One module per benchmark (`generate`, `train`, `plan` with its measuring program `plan_step`, `tokenizer` for
`verse bench tokenize`, `data`); `verse.commands.bench` imports only the one asked for.
"""
