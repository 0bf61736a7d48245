"""Reference photos: decoding and cropping (``photo``), face landmarks (``facerig``), the
server's avatar store (``store``) and photo ranking (``ranking``)."""
