"""3D segmentation studies: scoring a published ``seg3d`` model on each study's native grid on an
internal and an external test set (:mod:`.evaluate`), reports side by side (:mod:`.report`), and the
box-prompted protocol of the SAM study (:mod:`.boxes`, :mod:`.prompted`)."""
