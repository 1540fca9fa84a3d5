"""OpenVLA-OFT checkpoints (moojink/openvla-oft) as vlarl policies: parallel decoding of action chunks.

modeling.py    OFTPolicy (OpenVLAPolicy + proprio token, placeholders, 4-D attention mask, heads)
heads.py       ProprioProjector and the L1 regression head under upstream module names
film.py        FiLM (use_film): per-layer scale/shift of the towers by the instruction, its vision_backbone file
checkpoint.py  component files (action_head--*, proprio_projector--*, vision_backbone--*), model.oft checks, load/save
family.py      the family: detection, chunked action mapping, camera frames, supervised losses
tiny.py        a tiny random folder in the upstream layout (python -m vlarl.models.openvla_oft.tiny OUT)
"""
