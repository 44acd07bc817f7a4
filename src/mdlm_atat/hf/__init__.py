"""What makes an `atat export` folder loadable by transformers (issue 18).

`configuration_mdlm_atat.py` and `modeling_mdlm_atat.py` are copied into every export folder, as MDLM's hub
checkpoints ship theirs, and config.json's `auto_map` points transformers at them (`trust_remote_code=True`).
They are self-contained (torch and transformers only); nothing in the package imports them at run time.
`folder.py` writes the rest: the auto_map and the tokenizer files with MASK and PAD set.
"""
