"""Framework integrations. Each submodule imports its framework; importing geomcompile imports none.

* ``geomcompile.integrations.lightning.GeomCompile``: a Lightning Callback (``geomcompile[lightning]``).
* ``geomcompile.integrations.hf``: Hugging Face ``Trainer`` (``geomcompile[hf]``).
"""
