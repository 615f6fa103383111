"""What rig reads from the user's own files besides its code: ICT FaceKit and FLAME/DECA imports, and their status."""
