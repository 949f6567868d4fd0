"""How the pack patches ComfyUI: the attention-override slot, hooked copies of modules, routing of
chosen self-attention layers to a method (one AttentionCall view per kernel call), layer lists,
the sampling window, per-model-call state (call_state) and the per-run state holder (run_state).
Imports only the family adapters below it."""
