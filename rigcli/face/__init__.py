"""Face models and their parameters: FaceFit, the model interface, ICT FaceKit (embedded), FLAME, the registry."""
