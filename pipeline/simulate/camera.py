"""Camera view of the cell: drawn scenes, JPEG/PNG-encoded with OpenCV.

The static part (wall, floor, door, machine, belt) is drawn once per device; each frame
copies it and draws only what moves: the open door, the conveyor item, the machine's
fault lamp, a person, smoke and fire glow. Then lighting drift and flicker, and sensor
noise from a pre-drawn noise field sampled at a random offset (cheap at 1280x720).
The conveyor belongs to the line and runs in every class, so a stopped cell machine
(maintenance) is invisible to the camera: the camera confuses maintenance with intrusion.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from pipeline.records import Headers, Record
from pipeline.simulate.scenario import (
    DeviceSetup,
    EpisodePlan,
    ScenarioConfig,
    door_open,
    fire_progress,
    make_rng,
    person_at,
    plan_at,
)

Image = npt.NDArray[np.uint8]
Colour = tuple[int, int, int]  # BGR
_PAD = 32  # noise field margin: frames sample it at a random offset
_SHIRTS: tuple[Colour, ...] = (
    (0, 140, 255),
    (0, 220, 230),
    (90, 40, 20),
    (30, 30, 30),
    (120, 120, 120),
    (40, 40, 200),
    (230, 230, 230),
    (60, 140, 40),
)


@dataclass(frozen=True, eq=False)
class Scene:
    background: Image  # (H, W, 3) static part of the view
    noise: Image  # (H + _PAD, W + _PAD, 3) half-normal noise field
    machine: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels
    door: tuple[int, int, int, int]
    lamp: tuple[int, int, int]  # x, y, radius of the fault lamp
    belt: tuple[int, int]  # y0, y1 of the conveyor belt
    item_colour: Colour
    belt_speed: float  # pixels per ms
    gain: float  # base brightness gain
    drift: tuple[float, float, float]  # slow lighting drift: amplitude, period ms, phase


@dataclass(frozen=True)
class Look:
    shirt: Colour
    trousers: Colour
    skin: Colour
    helmet: Colour | None
    size: float  # height as a fraction of the frame height (at mid depth)


def _colour(rng: np.random.Generator, lo: int, hi: int) -> Colour:
    b, g, r = (int(v) for v in rng.integers(lo, hi, size=3))
    return b, g, r


def build_scene(setup: DeviceSetup, rng: np.random.Generator) -> Scene:
    """Draw the device's static view at its native resolution."""
    w, h = setup.width, setup.height
    bg: Image = np.empty((h, w, 3), np.uint8)
    horizon = int(h * rng.uniform(0.42, 0.5))
    bg[:horizon] = _colour(rng, 120, 220)  # wall
    bg[horizon:] = _colour(rng, 60, 130)  # floor
    for k in range(1, 4):  # fading floor seams give some depth
        y = horizon + int((h - horizon) * (k / 4) ** 1.5)
        cv2.line(bg, (0, y), (w, y), _colour(rng, 40, 100), max(1, h // 240))
    dx, dw = int(setup.door_x * w), int(w * 0.1)
    door = (dx - dw // 2, int(h * 0.1), dx + dw // 2, horizon)
    cv2.rectangle(bg, door[:2], door[2:], _colour(rng, 50, 160), -1)
    knob = (door[2] - dw // 6, (door[1] + door[3]) // 2)
    cv2.circle(bg, knob, max(2, w // 200), (40, 40, 40), -1)
    mx0 = int(w * rng.uniform(0.35, 0.5))
    if abs(mx0 - dx) < dw * 2:  # keep the machine off the door
        mx0 = int(w * 0.45) if dx < w // 2 else int(w * 0.28)
    machine = (
        mx0,
        int(h * rng.uniform(0.18, 0.3)),
        mx0 + int(w * rng.uniform(0.2, 0.28)),
        int(h * 0.74),
    )
    cv2.rectangle(bg, machine[:2], machine[2:], _colour(rng, 30, 200), -1)
    inset = max(2, w // 80)
    panel = (
        (machine[0] + inset, machine[1] + 4 * inset),
        (machine[2] - inset, machine[1] + 10 * inset),
    )
    cv2.rectangle(bg, panel[0], panel[1], _colour(rng, 10, 80), -1)
    lamp = (machine[0] + 3 * inset, machine[1] + 2 * inset, max(3, w // 70))
    belt = (int(h * 0.8), int(h * 0.86))
    cv2.rectangle(bg, (0, belt[0]), (w, belt[1]), _colour(rng, 25, 60), -1)
    noise = np.abs(rng.normal(0.0, rng.uniform(2.0, 6.0), (h + _PAD, w + _PAD, 3)))
    return Scene(
        background=bg,
        noise=np.minimum(noise, 255).astype(np.uint8),
        machine=machine,
        door=door,
        lamp=lamp,
        belt=belt,
        item_colour=_colour(rng, 40, 230),
        belt_speed=w * float(rng.uniform(0.05, 0.15)) / 1000.0,
        gain=float(rng.uniform(0.85, 1.1)),
        drift=(
            float(rng.uniform(0.03, 0.12)),
            float(rng.uniform(20000, 90000)),
            float(rng.uniform(0, 2 * math.pi)),
        ),
    )


def person_look(plan: EpisodePlan) -> Look:
    """Clothes and size of the episode's person: one distribution for every class."""
    rng = make_rng(plan.seed, "look")
    jitter = rng.integers(-25, 26, size=3)
    shirt = _SHIRTS[int(rng.integers(len(_SHIRTS)))]
    tone = int(rng.integers(60, 200))
    return Look(
        shirt=(
            int(np.clip(shirt[0] + jitter[0], 0, 255)),
            int(np.clip(shirt[1] + jitter[1], 0, 255)),
            int(np.clip(shirt[2] + jitter[2], 0, 255)),
        ),
        trousers=_colour(rng, 20, 110),
        skin=(tone * 2 // 3, tone * 4 // 5, tone),
        helmet=_SHIRTS[int(rng.integers(len(_SHIRTS)))] if rng.random() < 0.5 else None,
        size=float(rng.uniform(0.36, 0.48)),
    )


def _draw_person(img: Image, x: float, y: float, walking: bool, t_ms: float, look: Look) -> None:
    h, w = img.shape[:2]
    tall = look.size * h * (0.7 + 0.6 * (y - 0.62))  # nearer (lower) people look bigger
    fx, fy = int(x * w), int(y * h)
    hip, shoulder = (fx, int(fy - 0.48 * tall)), (fx, int(fy - 0.8 * tall))
    swing = 0.14 * tall * math.sin(t_ms / 1000.0 * 2 * math.pi * 0.9) if walking else 0.04 * tall
    limb = max(2, int(tall * 0.07))
    for s in (-1, 1):
        cv2.line(img, hip, (int(fx + s * swing), fy), look.trousers, limb)
        hand = (int(fx - s * swing * 0.8), int(hip[1] + 0.05 * tall))
        cv2.line(img, (fx, shoulder[1] + limb), hand, look.shirt, max(2, limb * 3 // 4))
    cv2.rectangle(
        img, (int(fx - 0.1 * tall), shoulder[1]), (int(fx + 0.1 * tall), hip[1]), look.shirt, -1
    )
    head = (fx, int(fy - 0.9 * tall))
    cv2.circle(img, head, max(2, int(0.075 * tall)), look.skin, -1)
    if look.helmet is not None:
        cv2.ellipse(
            img,
            head,
            (max(2, int(0.085 * tall)), max(2, int(0.06 * tall))),
            0,
            180,
            360,
            look.helmet,
            -1,
        )


def _smoke_blobs(plan: EpisodePlan, scene: Scene) -> npt.NDArray[np.float64]:
    """Rows of (birth ms, life ms, x px, vx px/ms, vy px/ms, radius px, growth px/ms, grey)."""
    rng = make_rng(plan.seed, "smoke")
    ep, (x0, _, x1, _) = plan.episode, scene.machine
    n = max(1, int((ep.end_ms - ep.start_ms) / 1000 * 6))
    h = scene.background.shape[0]
    return np.stack(
        [
            np.sort(rng.uniform(ep.start_ms, ep.end_ms, n)),
            rng.uniform(2500, 6000, n),
            rng.uniform(x0, x1, n),
            rng.normal(0, 0.02, n) * h / 1000,
            -rng.uniform(0.06, 0.14, n) * h / 1000,
            rng.uniform(0.04, 0.09, n) * h,
            rng.uniform(0.02, 0.06, n) * h / 1000,
            np.full(n, rng.uniform(80, 150)),
        ],
        axis=1,
    )


def _draw_fire(
    img: Image,
    scene: Scene,
    plan: EpisodePlan,
    t_ms: float,
    blobs: npt.NDArray[np.float64],
    rng: np.random.Generator,
) -> Image:
    progress = fire_progress(plan, t_ms)
    h, w = img.shape[:2]
    x0, y0, x1, y1 = scene.machine
    if progress > 0.05 and rng.random() < 0.75:  # flicker of orange at the machine's foot
        glow = (0, int(rng.integers(90, 180)), 255)
        axes = (
            max(2, int((x1 - x0) * rng.uniform(0.15, 0.35))),
            max(2, int(h * rng.uniform(0.02, 0.05))),
        )
        cv2.ellipse(img, (int((x0 + x1) / 2 + rng.normal(0, 3)), y1), axes, 0, 180, 360, glow, -1)
    sh, sw = max(8, h // 8), max(8, w // 8)
    alpha = np.zeros((sh, sw), np.float32)  # low-res smoke density
    age = t_ms - blobs[:, 0]
    for b, a in zip(
        blobs[(age >= 0) & (age < blobs[:, 1])], age[(age >= 0) & (age < blobs[:, 1])], strict=True
    ):
        strength = 0.6 * plan.intensity * fire_progress(plan, b[0]) * math.sin(math.pi * a / b[1])
        cx, cy = (b[2] + b[3] * a) * sw / w, (y0 + 0.1 * (y1 - y0) + b[4] * a) * sh / h
        blob = np.zeros_like(alpha)
        cv2.circle(blob, (int(cx), int(cy)), max(1, int((b[5] + b[6] * a) * sw / w)), strength, -1)
        alpha += blob
    haze = 0.45 * plan.intensity * progress
    alpha += haze * np.linspace(1.0, 0.4, sh, dtype=np.float32)[:, None]
    alpha = cv2.GaussianBlur(np.minimum(alpha, 0.85), (5, 5), 0)
    full = cv2.resize(alpha, (w, h), interpolation=cv2.INTER_LINEAR)[:, :, None]
    mixed = img.astype(np.float32)
    mixed += (float(blobs[0, 7]) - mixed) * full  # blend towards the smoke's grey
    return mixed.astype(np.uint8)


def render(
    scene: Scene,
    plan: EpisodePlan,
    t_ms: float,
    rng: np.random.Generator,
    blobs: npt.NDArray[np.float64] | None = None,
) -> Image:
    """The frame at world time `t_ms`; `blobs` (from _smoke_blobs) draws a fire."""
    img = scene.background.copy()
    h, w = img.shape[:2]
    if door_open(plan, t_ms):
        x0, y0, x1, y1 = scene.door
        cv2.rectangle(img, (x0, y0), (x1, y1), (25, 25, 30), -1)
        cv2.rectangle(img, (x0, y0), (x0 + (x1 - x0) // 4, y1 + (y1 - y0) // 12), (90, 90, 95), -1)
    iw = max(4, w // 16)
    ix = int((t_ms * scene.belt_speed) % (w + iw)) - iw
    item = ((ix, scene.belt[0] - iw * 3 // 4), (ix + iw, scene.belt[0] + 2))
    cv2.rectangle(img, item[0], item[1], scene.item_colour, -1)
    lx, ly, lr = scene.lamp
    blink = plan.warning_light and (t_ms // 400) % 2 == 0
    cv2.circle(img, (lx, ly), lr, (0, 60, 255) if blink else (50, 50, 60), -1)
    pose = person_at(plan, t_ms)
    if pose is not None:
        _draw_person(img, *pose, t_ms, person_look(plan))
    if blobs is not None:
        img = _draw_fire(img, scene, plan, t_ms, blobs, rng)
    amp, period, phase = scene.drift
    gain = scene.gain * (1 + amp * math.sin(2 * math.pi * t_ms / period + phase))
    img = np.asarray(cv2.convertScaleAbs(img, alpha=gain * (1 + rng.normal(0, 0.012))), np.uint8)
    oy, ox, ny, nx = (int(v) for v in rng.integers(0, _PAD, size=4))
    cv2.add(img, scene.noise[oy : oy + h, ox : ox + w], dst=img)
    cv2.subtract(img, scene.noise[ny : ny + h, nx : nx + w], dst=img)
    return img


def encode(img: Image, setup: DeviceSetup) -> bytes:
    if setup.image_format == "png":
        ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    else:
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, setup.jpeg_quality])
    if not ok:
        raise RuntimeError(f"OpenCV failed to encode a {img.shape} frame as {setup.image_format}")
    return bytes(buf.tobytes())


def camera_records(
    cfg: ScenarioConfig, setup: DeviceSetup, plans: Sequence[EpisodePlan], topic: str
) -> Iterator[Record]:
    """One frame every 1000/fps ms (+-2 ms jitter), stamped on the camera's skewed clock."""
    rng = make_rng(cfg.seed, setup.index, "camera")
    scene = build_scene(setup, make_rng(cfg.seed, setup.index, "scene"))
    starts = [p.episode.start_ms for p in plans]
    period = 1000.0 / setup.fps
    phase = float(rng.uniform(0, period))
    headers: Headers = ()
    if setup.content_type_headers:
        headers = (("content-type", f"image/{setup.image_format}".encode()),)
    key, blobs, blob_plan = setup.device_id.encode(), None, -1
    jitter = min(2, int(period / 4))  # never reorders frames
    for k in range(int(cfg.duration_s * setup.fps) + 2):
        ts = cfg.start_ms + int(phase + k * period) + int(rng.integers(-jitter, jitter + 1))
        if ts >= cfg.end_ms:
            return
        t_world = ts - setup.camera_offset_ms
        plan = plan_at(plans, starts, t_world)
        if plan.label == "fire" and blob_plan != plan.episode.start_ms:
            blobs, blob_plan = _smoke_blobs(plan, scene), plan.episode.start_ms
        frame = render(scene, plan, t_world, rng, blobs if plan.label == "fire" else None)
        yield Record(topic, -1, -1, max(ts, cfg.start_ms), key, encode(frame, setup), headers)
