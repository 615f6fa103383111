"""Photos in, pixels out: read a file, find the face and its landmarks, align the crop, draw sheets, compare images."""
