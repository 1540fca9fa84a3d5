"""A scripted pick-and-place controller for LIBERO that reads the simulator's state (privileged).

`PickPlace` solves goals of the form `(On A B)` (libero_spatial: a bowl onto the plate) and
`(In A B_contain_region)` (libero_object: an item into the basket) with a small state machine:

    reach -> descend -> close -> lift -> carry -> lower -> release -> retreat

Each phase sets a target for the gripper site and a proportional controller turns the error into
robosuite's OSC_POSE delta action (xyz and axis-angle deltas scaled by the controller's output
range, so 1.0 asks for 5 cm / 0.5 rad), clipped to [-1, 1]; the gripper is -1 open, +1 closed.
The grasp comes from the object's collision geometry: objects narrower than the open fingers are
grasped across their narrowest horizontal width (the gripper turns about z to match); wider ones
(the bowls) are grasped by the rim, one finger inside and one outside. Carry and lower steer the
held object, not the gripper, over the target, so a grasp that slipped sideways still lands inside
the 3 cm that LIBERO's `On` allows. A lift that leaves the object on the table retries the grasp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

FINGER_SPAN = 0.08  # the Panda's open fingers, m
HAND_HALF = (0.11, 0.035)  # the hand's footprint around the grip site: along / across the finger line, m
RIM_INSET = 0.012  # rim grasp: gripper centre this far inside the object's outer edge, m
REACH = 0.65  # grasps farther from the robot's base (horizontally) are penalised: the arm nears full stretch, m
FINGERTIP_CLEARANCE = 0.013  # the pads reach this far below the grip site, m
APPROACH_HEIGHT = 0.08  # reach: this far above the grasp point before descending, m
CARRY_CLEARANCE = 0.04  # carry: held object's bottom this far above every other object's top, m
RELEASE_HEIGHT = {"on": 0.015, "in": 0.04}  # lower: held object's bottom above the target surface, m
POS_GAIN = 1.5  # action per output range of position error (1 cm -> 0.3, about 4 mm per step)
ROT_GAIN = 1.5  # action per output range of orientation error
POS_TOL, YAW_TOL = 0.008, 0.06  # a phase's target counts as reached within these (m, rad)
GRIP_STEPS, RELEASE_STEPS = 12, 8  # the fingers close/open fully in about 10 control steps
PHASE_LIMIT = 70  # a phase that has not converged after this many steps moves on
MAX_ATTEMPTS = 3  # grasp tries before the controller gives up and holds still


class UnsupportedGoal(ValueError):
    """A BDDL goal this controller does not script (only single On / In goals are)."""


@dataclass(frozen=True)
class Goal:
    kind: str  # "on" (onto an object) or "in" (into a site region, such as basket_1_contain_region)
    obj: str  # the object to pick, e.g. akita_black_bowl_1
    target: str  # the object or region site it goes onto / into, e.g. plate_1


def parse_goal(goal_state: list) -> Goal:
    """LIBERO's parsed BDDL goal (e.g. [['on', 'akita_black_bowl_1', 'plate_1']]) -> Goal."""
    if len(goal_state) != 1 or len(goal_state[0]) != 3 or goal_state[0][0].lower() not in ("on", "in"):
        raise UnsupportedGoal(f"goal {goal_state} is not a single (On A B) or (In A B) predicate; the scripted "
                              "demonstrator covers pick-and-place suites such as libero_spatial and libero_object.")
    kind, obj, target = goal_state[0]
    return Goal(kind.lower(), obj, target)


def axis_angle_between(r_from: np.ndarray, r_to: np.ndarray) -> np.ndarray:
    """(3, 3) rotations -> (3,) world-frame axis * angle of r_to @ r_from.T (what OSC's rotation delta means)."""
    r = r_to @ r_from.T
    angle = math.acos(float(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0)))
    if angle < 1e-6:
        return np.zeros(3)
    axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    norm = np.linalg.norm(axis)
    if norm < 1e-9:  # a half turn: r + I = 2 a a^T, so its largest column points along the axis a
        m = r + np.eye(3)
        axis = m[:, int(np.argmax(np.linalg.norm(m, axis=0)))]
        norm = np.linalg.norm(axis)
    return axis / norm * angle


def rot_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def wrap_half_turn(angle: float) -> float:
    """An angle of a finger axis (which has no sign) -> the same axis in [-pi/2, pi/2)."""
    return (angle + math.pi / 2) % math.pi - math.pi / 2


class Scene:
    """Privileged readings of one LIBERO env (the robosuite env behind LIBERO's ControlEnv): poses of
    objects and sites, object extents from their collision geometry, the gripper site and fingers.
    robosuite rebuilds its MjSim on every hard reset: make a new Scene after each reset."""

    def __init__(self, env):
        import mujoco

        self.env = env  # libero's problem env (ControlEnv.env)
        self.model, self.data = env.sim.model._model, env.sim.data._data
        self.robot = env.robots[0]
        self._mujoco = mujoco
        self._verts: dict[str, list[tuple[int, np.ndarray]]] = {}
        pads = self.robot.gripper.important_geoms
        self._pads = [self.model.geom(pads["left_fingerpad"][0]).id, self.model.geom(pads["right_fingerpad"][0]).id]

    # ---- robot ---------------------------------------------------------------------------------
    def eef_pos(self) -> np.ndarray:  # (3,) the grip site, which OSC moves
        return self.data.site_xpos[self.robot.eef_site_id].copy()

    def eef_rot(self) -> np.ndarray:  # (3, 3) the grip site's orientation in the world
        return self.data.site_xmat[self.robot.eef_site_id].reshape(3, 3).copy()

    def finger_angle(self) -> float:
        """World yaw of the line along which the fingers close."""
        d = self.data.geom_xpos[self._pads[1]] - self.data.geom_xpos[self._pads[0]]
        return math.atan2(d[1], d[0])

    def gripper_width(self) -> float:
        return float(np.linalg.norm(self.data.geom_xpos[self._pads[1]] - self.data.geom_xpos[self._pads[0]]))

    # ---- objects -------------------------------------------------------------------------------
    def object_names(self) -> list[str]:
        return list(self.env.objects_dict)

    def body_pos(self, name: str) -> np.ndarray:  # (3,) the object's root body
        return self.data.xpos[self.env.obj_body_id[name]].copy()

    def site_pos(self, name: str) -> np.ndarray:  # (3,) a region site such as basket_1_contain_region
        return self.data.site_xpos[self.model.site(self.env.object_sites_dict[name].name).id].copy()

    def site_parent(self, name: str) -> str:
        return self.env.object_sites_dict[name].parent_name

    def is_site(self, name: str) -> bool:
        return name in self.env.object_sites_dict and name not in self.env.obj_body_id

    def points(self, name: str) -> np.ndarray:
        """(N, 3) world points bounding the object's collision geoms (mesh vertices, box corners)."""
        if name not in self._verts:
            self._verts[name] = self._local_points(self.env.obj_body_id[name])
        out = [self.data.geom_xpos[g] + v @ self.data.geom_xmat[g].reshape(3, 3).T for g, v in self._verts[name]]
        return np.concatenate(out) if out else self.body_pos(name)[None]

    def obstacle_boxes(self, exclude: str) -> np.ndarray:
        """(G, 2, 3) world boxes (min, max corners) of every collision geom of the other objects and fixtures."""
        out = []
        for name in [*self.env.objects_dict, *self.env.fixtures_dict]:
            if name == exclude or name not in self.env.obj_body_id:
                continue
            self.points(name)  # fills the cache
            for g, v in self._verts[name]:
                w = self.data.geom_xpos[g] + v @ self.data.geom_xmat[g].reshape(3, 3).T
                out.append((w.min(0), w.max(0)))
        return np.array(out).reshape(-1, 2, 3)

    def extent(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        p = self.points(name)
        return p.min(0), p.max(0)  # (3,), (3,)

    def _local_points(self, root: int) -> list[tuple[int, np.ndarray]]:
        m, mj = self.model, self._mujoco
        bodies = {root}
        for b in range(root + 1, m.nbody):  # MuJoCo numbers children after their parents
            if m.body_parentid[b] in bodies:
                bodies.add(b)
        corners = np.array([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)], float)  # (8, 3)
        out = []
        for g in range(m.ngeom):
            if m.geom_bodyid[g] not in bodies or (m.geom_contype[g] == 0 and m.geom_conaffinity[g] == 0):
                continue  # visual-only geoms do not touch anything
            size, kind = m.geom_size[g], m.geom_type[g]
            if kind == mj.mjtGeom.mjGEOM_MESH:
                mesh = m.geom_dataid[g]
                v = m.mesh_vert[m.mesh_vertadr[mesh]:m.mesh_vertadr[mesh] + m.mesh_vertnum[mesh]].astype(float)
            elif kind == mj.mjtGeom.mjGEOM_BOX:
                v = corners * size
            elif kind in (mj.mjtGeom.mjGEOM_CYLINDER, mj.mjtGeom.mjGEOM_CAPSULE):
                v = corners * np.array([size[0], size[0], size[1] + (size[0] if kind == mj.mjtGeom.mjGEOM_CAPSULE
                                                                      else 0.0)])
            else:
                v = corners * m.geom_rbound[g]
            out.append((g, v))
        return out


@dataclass
class Grasp:
    offset: np.ndarray  # (3,) grasp point minus the object's body position when planned, world frame
    finger_angle: float  # world yaw of the finger-closing line at the grasp
    rim: bool  # grasped by the rim (object wider than the fingers)


def plan_grasp(scene: Scene, obj: str) -> Grasp:
    """Where and at which yaw to grasp `obj`, from its collision points: across its narrowest width when
    that fits between the fingers, else by the rim; among the candidates, the one whose hand footprint
    keeps clearest of other objects and fixtures (a cabinet beside a bowl), then the smallest turn."""
    pts = scene.points(obj)  # (N, 3)
    lo, hi = pts.min(0), pts.max(0)
    xy = pts[:, :2]
    current = scene.finger_angle()
    body_z = lo[2] + max(FINGERTIP_CLEARANCE, min(0.6 * (hi[2] - lo[2]), hi[2] - lo[2] - 0.025))
    boxes = scene.obstacle_boxes(exclude=obj)  # (G, 2, 3)
    base = scene.robot.base_pos[:2]

    def far(p: np.ndarray) -> float:
        return 0.5 * max(0.0, float(np.linalg.norm(p - base)) - REACH)

    body, rim = [], []
    for step in range(12):  # closing lines every 15 degrees
        turn = wrap_half_turn(math.radians(15 * step))
        u = np.array([math.cos(current + turn), math.sin(current + turn)])
        v = np.array([-u[1], u[0]])
        along, across = xy @ u, xy @ v
        width = along.max() - along.min()
        centre = u * (along.max() + along.min()) / 2 + v * (across.max() + across.min()) / 2  # (2,)
        if width < FINGER_SPAN - 0.01:
            clear = footprint_clearance(boxes, centre, u, body_z)
            body.append((-min(clear, 0.03) + 0.2 * width + 0.01 * abs(turn) + far(centre), centre, body_z, turn))
        for sign in (1.0, -1.0):  # rim: one finger inside, one outside the wall
            p = centre + sign * u * (width / 2 - RIM_INSET)
            near = pts[np.linalg.norm(xy - p, axis=1) < 0.025, 2]  # the wall there (a bowl may sit tilted)
            rim_z = (near.max() if len(near) else hi[2]) - 0.015
            clear = footprint_clearance(boxes, p, u, rim_z)
            low = hi[2] - 0.015 - rim_z  # a tilted bowl's low side: its inside rises close to the rim
            rim.append((-min(clear, 0.05) + 0.01 * abs(turn) + far(p) + low, p, rim_z, turn))
    _, point, z, turn = min(body or rim, key=lambda c: c[0])
    return Grasp(np.array([*point, z]) - scene.body_pos(obj), current + turn, rim=not body)


def footprint_clearance(boxes: np.ndarray, centre: np.ndarray, u: np.ndarray, z: float) -> float:
    """Distance in the plane from the hand's footprint at a grasp (centre (2,), finger line u (2,)) to the
    boxes (G, 2, 3) that reach above the fingertips; 1 m when none do."""
    boxes = boxes[boxes[:, 1, 2] > z - FINGERTIP_CLEARANCE]
    if not len(boxes):
        return 1.0
    v = np.array([-u[1], u[0]])
    a, b = np.meshgrid(np.linspace(-HAND_HALF[0], HAND_HALF[0], 12), np.linspace(-HAND_HALF[1], HAND_HALF[1], 4))
    grid = centre + a.reshape(-1, 1) * u + b.reshape(-1, 1) * v  # (48, 2)
    lo, hi = boxes[None, :, 0, :2], boxes[None, :, 1, :2]  # (1, G, 2)
    gap = np.maximum(np.maximum(lo - grid[:, None], grid[:, None] - hi), 0.0)  # (48, G, 2)
    return float(np.linalg.norm(gap, axis=-1).min())


@dataclass
class PickPlace:
    """The state machine. Call `act(scene)` once per control step; `phase` says where it is."""

    goal: Goal
    phase: str = "plan"
    attempts: int = 0
    steps_in_phase: int = 0
    grasp: Grasp | None = None
    rot_goal: np.ndarray | None = None  # (3, 3) grip-site orientation held for this attempt
    carry_z: float = 0.0  # height of the held object's bottom while carrying
    lift_from: float = 0.0  # object's body height before the lift
    hold: np.ndarray | None = None  # (3,) object body minus grip site once lifted
    anchor: np.ndarray | None = None  # (3,) grip-site position when the phase began
    fixed: np.ndarray | None = None  # (3,) the grasp point as the descent began
    obj_start: np.ndarray | None = None  # (3,) the object's position as the descent began
    history: list = field(default_factory=list)  # (3,) grip-site positions of this phase's last steps

    def act(self, scene: Scene) -> np.ndarray:
        """(7,) OSC_POSE delta action in [-1, 1] for the current state of `scene`."""
        if self.phase == "plan":
            self._plan(scene)
        eef = scene.eef_pos()
        if self.steps_in_phase == 0:
            self.anchor = eef
        self.history = (self.history + [eef])[-6:]
        self.steps_in_phase += 1
        target, grip = getattr(self, f"_{self.phase}")(scene, eef)
        return self._action(scene, eef, target, grip)

    # ---- phases: each returns (target grip-site position (3,), gripper command) ------------------
    def _plan(self, scene: Scene) -> None:
        self.grasp = plan_grasp(scene, self.goal.obj)
        turn = wrap_half_turn(self.grasp.finger_angle - scene.finger_angle())
        self.rot_goal = rot_z(turn) @ level(scene.eef_rot())
        self.attempts += 1
        self._enter("reach" if self.attempts <= MAX_ATTEMPTS else "idle")

    def _grasp_point(self, scene: Scene) -> np.ndarray:
        return scene.body_pos(self.goal.obj) + self.grasp.offset

    def _reach(self, scene, eef):
        target = self._grasp_point(scene) + np.array([0.0, 0.0, APPROACH_HEIGHT])
        turned = abs(wrap_half_turn(self.grasp.finger_angle - scene.finger_angle())) < YAW_TOL
        if (self._reached(eef, target) or self._stalled()) and turned or self._timeout():
            self._enter("descend")
        return target, -1.0

    def _descend(self, scene, eef):
        if self.steps_in_phase == 1:  # from here on the grasp point stays put: chasing a nudged object pushes it
            self.fixed = self._grasp_point(scene)
            self.obj_start = scene.body_pos(self.goal.obj)
        touched = np.linalg.norm(scene.body_pos(self.goal.obj) - self.obj_start) > 0.01
        if self._reached(eef, self.fixed) or self._stalled() or touched or self._timeout():
            self._enter("close")
        return self.fixed, -1.0

    def _close(self, scene, eef):
        if self.steps_in_phase >= GRIP_STEPS:
            self.lift_from = scene.body_pos(self.goal.obj)[2]
            self.carry_z = self._carry_height(scene)
            self._enter("lift")
        return self.anchor, 1.0

    def _lift(self, scene, eef):
        bottom = scene.extent(self.goal.obj)[0][2]
        target = np.array([*self.anchor[:2], eef[2] + self.carry_z - bottom])
        if self.steps_in_phase > 8 and scene.body_pos(self.goal.obj)[2] - self.lift_from < 0.01:
            self._enter("regrasp")  # the object stayed where it was
        elif self._reached(eef, target) or self._stalled() or self._timeout():
            self.hold = scene.body_pos(self.goal.obj) - eef
            self._enter("carry")
        return target, 1.0

    def _regrasp(self, scene, eef):
        target = np.array([*self.anchor[:2], self._grasp_point(scene)[2] + APPROACH_HEIGHT])
        if self._reached(eef, target) or self._timeout():
            self._enter("plan")
        return target, -1.0

    def _carry(self, scene, eef):
        if self._dropped(scene, eef):
            self._enter("regrasp")
            return self._regrasp(scene, eef)
        shift = self._place_xy(scene) - scene.body_pos(self.goal.obj)[:2]
        bottom = scene.extent(self.goal.obj)[0][2]
        target = np.array([eef[0] + shift[0], eef[1] + shift[1], eef[2] + self.carry_z - bottom])
        if np.linalg.norm(shift) < POS_TOL or self._timeout():
            self._enter("lower")
        return target, 1.0

    def _lower(self, scene, eef):
        shift = self._place_xy(scene) - scene.body_pos(self.goal.obj)[:2]
        drop = scene.extent(self.goal.obj)[0][2] - (self._surface(scene) + RELEASE_HEIGHT[self.goal.kind])
        target = np.array([eef[0] + shift[0], eef[1] + shift[1], eef[2] - drop])
        if (abs(drop) < POS_TOL / 2 and np.linalg.norm(shift) < POS_TOL) or self._stalled() or self._timeout():
            self._enter("release")
        return target, 1.0

    def _release(self, scene, eef):
        if self.steps_in_phase >= RELEASE_STEPS:
            self._enter("retreat")
        return self.anchor, -1.0

    def _retreat(self, scene, eef):
        return np.array([*self.anchor[:2], max(self.anchor[2], self._surface(scene) + 0.15)]), -1.0

    def _idle(self, scene, eef):
        return eef, -1.0

    # ---- helpers -------------------------------------------------------------------------------
    @property
    def gave_up(self) -> bool:
        """MAX_ATTEMPTS grasps failed; the controller now only holds still."""
        return self.phase == "idle"

    def _enter(self, phase: str) -> None:
        self.phase, self.steps_in_phase, self.history = phase, 0, []

    def _reached(self, eef: np.ndarray, target: np.ndarray) -> bool:
        return bool(np.linalg.norm(target - eef) < POS_TOL)

    def _stalled(self) -> bool:
        """Blocked (by the table, the object): under 1.5 mm of motion over the last five steps."""
        return len(self.history) >= 6 and np.linalg.norm(self.history[-1] - self.history[0]) < 0.0015

    def _timeout(self) -> bool:
        return self.steps_in_phase >= PHASE_LIMIT

    def _dropped(self, scene: Scene, eef: np.ndarray) -> bool:
        return bool(np.linalg.norm(scene.body_pos(self.goal.obj) - eef - self.hold) > 0.04)

    def _place_xy(self, scene: Scene) -> np.ndarray:
        """(2,) where the held object's body should end up: the target object's or region's centre."""
        if scene.is_site(self.goal.target):
            return scene.site_pos(self.goal.target)[:2]
        return scene.body_pos(self.goal.target)[:2]

    def _surface(self, scene: Scene) -> float:
        """Height the held object is set down on: the target's top (On) or the container's floor (In)."""
        if scene.is_site(self.goal.target):
            return scene.extent(scene.site_parent(self.goal.target))[0][2] + 0.01
        return scene.extent(self.goal.target)[1][2]

    def _carry_height(self, scene: Scene) -> float:
        """Carry the held object's bottom above every other object's top (and 5 cm above where it was)."""
        tops = [scene.extent(n)[1][2] for n in scene.object_names() if n != self.goal.obj]
        bottom = scene.extent(self.goal.obj)[0][2]
        return max(max(tops, default=bottom), bottom + 0.05) + CARRY_CLEARANCE

    def _action(self, scene: Scene, eef: np.ndarray, target: np.ndarray, grip: float) -> np.ndarray:
        """Proportional control in the units of OSC_POSE's output range (an action of 1.0 asks for
        output_max: 5 cm and 0.5 rad by default); the position part keeps its direction when capped."""
        out = np.asarray(scene.robot.controller.output_max, float)  # (6,)
        pos = POS_GAIN * (target - eef) / out[:3]
        norm = np.linalg.norm(pos)
        if norm > 1.0:
            pos /= norm
        rot = ROT_GAIN * axis_angle_between(scene.eef_rot(), self.rot_goal) / out[3:6]
        return np.concatenate([pos, np.clip(rot, -1.0, 1.0), [grip]]).astype(np.float64)


def level(rot: np.ndarray) -> np.ndarray:
    """(3, 3) grip-site orientation -> the same heading with the fingers pointing straight down."""
    x = np.array([rot[0, 0], rot[1, 0], 0.0])
    x /= np.linalg.norm(x)
    z = np.array([0.0, 0.0, -1.0])
    return np.stack([x, np.cross(z, x), z], axis=1)
