"""An independent reference for shapes edits: the instruction parsed from its words and
applied to a scene (written from the instruction templates, not from shapes_edit)."""
import re

from data_pipelines import shapes


def apply_instruction(instruction: str, scene: shapes.Scene) -> set:
    """The instruction applied to the scene, parsed from its words (independent of
    shapes_edit's generator): the set of (shape, color, size, row, col)."""
    cells = {shapes.cell_name(r, c): (r, c) for r in range(3) for c in range(3)}
    by_color = {s.color: s for s in scene.shapes}  # colours are unique in a scene
    out = {(s.shape, s.color, s.size, s.row, s.col) for s in scene.shapes}
    words = instruction.split()
    if words[0] == "add":
        m = re.fullmatch(r"add a (\w+) (\w+) (\w+) at the (.+)", instruction)
        size, color, shape, cell = m.groups()
        return out | {(shape, color, size, *cells[cell])}
    # "<verb> the <color> <shape> ...": found by colour; its shape is the instruction's
    # (a scene read by the detector may carry a pixel-identical twin shape).
    found = by_color[words[2]]
    out.discard((found.shape, found.color, found.size, found.row, found.col))
    subject = shapes.ShapeSpec(words[3], found.color, found.size, found.row, found.col)
    if words[0] == "remove":
        return out
    if words[0] == "move":
        return out | {(subject.shape, subject.color, subject.size,
                       *cells[instruction.split(" to the ", 1)[1]])}
    last = words[-1]
    if last in shapes.SIZES:
        return out | {(subject.shape, subject.color, last, subject.row, subject.col)}
    return out | {(subject.shape, last, subject.size, subject.row, subject.col)}
