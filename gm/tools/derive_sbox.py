#!/usr/bin/env python3
"""Derives every S-box constant of ferry-gm from the algebraic form of the SM4 S-box.

SM4's S-box is S(x) = A . inv(A . x + C) + C over GF(2^8) modulo
f = x^8+x^7+x^6+x^5+x^4+x^2+1 (0x1F5), with A the circulant matrix whose row i is
rotl(0xA7, i) and C = 0xD3. Moving the inversion into another field by an
isomorphism T gives S(x) = (A.T^-1) . inv'(T.A.x + T.C) + C, which is what each
backend evaluates:

* GFNI: inv' is the AES-field inversion of gf2p8affineinvqb; prints the two
  affine matrices and constants as GFNI qwords.
* AES-NI: inv' comes from AESENCLAST (AES S-box = A_aes . inv + 0x63); prints the
  nibble tables of the pre- and post-affine maps for PSHUFB.
* portable: inv' is a tower-field inversion GF((2^4)^2) written as a boolean circuit;
  writes gm/src/portable/circuit.rs.

Each result is checked here against the S-box table computed from the definition
(whose first bytes are the standard's d6 90 e9 fe), and again by the crate's tests.

Run: python3 gm/tools/derive_sbox.py  (from the workspace root)
"""

import os

F_POLY = 0x1F5
AES_POLY = 0x11B
C = 0xD3


def rotl8(v, i):
    return ((v << i) | (v >> (8 - i))) & 0xFF


def parity(x):
    return bin(x).count("1") & 1


# A matrix is 8 row bytes; output bit i = parity(row[i] & x).
def mat_apply(rows, x):
    return sum(parity(rows[i] & x) << i for i in range(len(rows)))


def mat_from_fn(fn, n=8):
    # column j = fn(e_j); row i collects bit i of every column.
    cols = [fn(1 << j) for j in range(n)]
    return [sum(((cols[j] >> i) & 1) << j for j in range(n)) for i in range(n)]


def mat_mul(a, b):
    return mat_from_fn(lambda x: mat_apply(a, mat_apply(b, x)))


def mat_inv(rows):
    table = {mat_apply(rows, x): x for x in range(256)}
    assert len(table) == 256, "matrix not invertible"
    return mat_from_fn(lambda y: table[y])


def gmul(a, b, poly):
    r = 0
    while b:
        if b & 1:
            r ^= a
        b >>= 1
        a <<= 1
        if a & 0x100:
            a ^= poly
    return r


def ginv(a, poly):
    return 0 if a == 0 else next(b for b in range(1, 256) if gmul(a, b, poly) == 1)


A = [rotl8(0xA7, i) for i in range(8)]
SBOX = [mat_apply(A, ginv(mat_apply(A, x) ^ C, F_POLY)) ^ C for x in range(256)]
assert SBOX[:4] == [0xD6, 0x90, 0xE9, 0xFE]


def root_of_f(mul):
    """An element b of the target field with f(b) = 0, for the isomorphism x -> b."""
    for b in range(2, 256):
        acc, p = 0, 1
        for i in range(9):
            if (F_POLY >> i) & 1:
                acc ^= p
            p = mul(p, b)
        if acc == 0:
            return b
    raise AssertionError("f has no root")


def iso(mul):
    b = root_of_f(mul)
    powers = [1]
    for _ in range(7):
        powers.append(mul(powers[-1], b))
    return mat_from_fn(lambda x: sum_xor(powers[j] for j in range(8) if (x >> j) & 1))


def sum_xor(it):
    r = 0
    for v in it:
        r ^= v
    return r


def gfni_qword(rows):
    # GF2P8AFFINEQB: result bit i = parity(matrix byte (7 - i) & x).
    return sum(rows[i] << (8 * (7 - i)) for i in range(8))


# ---------------------------------------------------------------- GFNI / AES-NI
T_AES = iso(lambda a, b: gmul(a, b, AES_POLY))
M1 = mat_mul(T_AES, A)
C1 = mat_apply(T_AES, C)
M2 = mat_mul(A, mat_inv(T_AES))
C2 = C
for x in range(256):
    assert mat_apply(M2, ginv(mat_apply(M1, x) ^ C1, AES_POLY)) ^ C2 == SBOX[x]

A_AES = [rotl8(0xF1, i) for i in range(8)]  # AES affine map, row i = rotl(0xF1, i)
AES_SBOX = [mat_apply(A_AES, ginv(x, AES_POLY)) ^ 0x63 for x in range(256)]
assert AES_SBOX[:4] == [0x63, 0x7C, 0x77, 0x7B]
P = mat_mul(M2, mat_inv(A_AES))
P_C = mat_apply(P, 0x63) ^ C2
for x in range(256):
    assert mat_apply(P, AES_SBOX[mat_apply(M1, x) ^ C1]) ^ P_C == SBOX[x]


def nibble_tables(rows, const):
    lo = [mat_apply(rows, n) ^ const for n in range(16)]
    hi = [mat_apply(rows, n << 4) for n in range(16)]
    return lo, hi


# ---------------------------------------------------------------- tower field
# GF(16) = GF(2)[z]/(z^4+z+1); GF(256) = GF(16)[Y]/(Y^2+Y+LAMBDA); a byte holds
# (high nibble)*Y + (low nibble).
def g16mul(a, b):
    r = 0
    for i in range(4):
        if (b >> i) & 1:
            r ^= a << i
    for i in (6, 5, 4):
        if (r >> i) & 1:
            r ^= 0b10011 << (i - 4)
    return r


def g16inv(a):
    return 0 if a == 0 else next(b for b in range(1, 16) if g16mul(a, b) == 1)


def trace16(a):
    t, p = 0, a
    for _ in range(4):
        t ^= p
        p = g16mul(p, p)
    return t


LAMBDA = next(l for l in range(1, 16) if trace16(l) == 1)


def tmul(a, b):
    ah, al, bh, bl = a >> 4, a & 15, b >> 4, b & 15
    hh = g16mul(ah, bh)
    h = hh ^ g16mul(ah, bl) ^ g16mul(al, bh)
    l = g16mul(al, bl) ^ g16mul(LAMBDA, hh)
    return (h << 4) | l


T_TOWER = iso(tmul)
M_IN = mat_mul(T_TOWER, A)
C_IN = mat_apply(T_TOWER, C)
M_OUT = mat_mul(A, mat_inv(T_TOWER))


class Circuit:
    """Straight-line code over bitsliced words, simulated on 256-bit ints."""

    def __init__(self):
        self.lines = []
        self.n = 0
        self.ands = 0
        self.xors = 0

    def var(self, expr, value):
        name = f"t{self.n}"
        self.n += 1
        self.lines.append(f"    let {name} = {expr};")
        return (name, value)

    def xor(self, a, b):
        self.xors += 1
        return self.var(f"{a[0]} ^ {b[0]}", a[1] ^ b[1])

    def and_(self, a, b):
        self.ands += 1
        return self.var(f"{a[0]} & {b[0]}", a[1] & b[1])

    def not_(self, a):
        self.xors += 1
        return self.var(f"!{a[0]}", a[1] ^ ((1 << 256) - 1))

    def xor_all(self, terms):
        acc = terms[0]
        for t in terms[1:]:
            acc = self.xor(acc, t)
        return acc

    def linear(self, rows, bits, const=0):
        out = []
        for i, row in enumerate(rows):
            v = self.xor_all([bits[j] for j in range(len(bits)) if (row >> j) & 1])
            out.append(self.not_(v) if (const >> i) & 1 else v)
        return out


def g16_mul_circuit(c, a, b):
    prod = [[] for _ in range(7)]
    for i in range(4):
        for j in range(4):
            prod[i + j].append(c.and_(a[i], b[j]))
    p = [c.xor_all(t) for t in prod]
    # z^4 = z + 1, z^5 = z^2 + z, z^6 = z^3 + z^2
    return [
        c.xor(p[0], p[4]),
        c.xor_all([p[1], p[4], p[5]]),
        c.xor_all([p[2], p[5], p[6]]),
        c.xor(p[3], p[6]),
    ]


def g16_inv_circuit(c, a):
    # Algebraic normal form of each output bit, monomials shared.
    anf = []
    for bit in range(4):
        coef = [(g16inv(x) >> bit) & 1 for x in range(16)]
        for i in range(4):
            for m in range(16):
                if (m >> i) & 1:
                    coef[m] ^= coef[m ^ (1 << i)]
        anf.append([m for m in range(16) if coef[m]])
    mono = {}

    def monomial(m):
        if m in mono:
            return mono[m]
        bits = [i for i in range(4) if (m >> i) & 1]
        if len(bits) == 1:
            mono[m] = a[bits[0]]
        else:
            top = 1 << bits[-1]
            mono[m] = c.and_(monomial(m ^ top), a[bits[-1]])
        return mono[m]

    assert all(0 not in terms for terms in anf), "inverse of 0 must be 0"
    return [c.xor_all([monomial(m) for m in terms]) for terms in anf]


def linear4(fn):
    return [sum(((fn(1 << j) >> i) & 1) << j for j in range(4)) for i in range(4)]


def build_circuit():
    c = Circuit()
    xs = [(f"x[{i}]", sum(((x >> i) & 1) << x for x in range(256))) for i in range(8)]
    a = c.linear(M_IN, xs, C_IN)
    al, ah = a[:4], a[4:]
    # d = LAMBDA*ah^2 + ah*al + al^2: the two squarings are linear.
    sq_l = c.linear(linear4(lambda v: g16mul(LAMBDA, g16mul(v, v))), ah)
    sq_al = c.linear(linear4(lambda v: g16mul(v, v)), al)
    m = g16_mul_circuit(c, ah, al)
    d = [c.xor_all([sq_l[i], sq_al[i], m[i]]) for i in range(4)]
    di = g16_inv_circuit(c, d)
    oh = g16_mul_circuit(c, ah, di)
    s = [c.xor(ah[i], al[i]) for i in range(4)]
    ol = g16_mul_circuit(c, s, di)
    out = c.linear(M_OUT, ol + oh, C)
    for x in range(256):
        assert sum(((out[i][1] >> x) & 1) << i for i in range(8)) == SBOX[x]
    return c, out


def emit_circuit(path):
    c, out = build_circuit()
    body = "\n".join(c.lines)
    ret = ", ".join(o[0] for o in out)
    text = f"""//! The SM4 S-box as a boolean circuit over bitsliced words (generated by
//! gm/tools/derive_sbox.py; do not edit by hand, re-run the script).
//!
//! Input and output bit i of every lane is bit i of an S-box byte. The inversion is
//! done in the tower field GF((2^4)^2) (GF(16) = GF(2)[z]/(z^4+z+1), Y^2 = Y + {LAMBDA:#x}),
//! reached from SM4's field and its affine maps by two 8x8 linear layers. Only AND,
//! XOR and NOT on whole words: no branch and no memory index depends on the data.
//! {c.ands} ANDs, {c.xors} XOR/NOTs.

use super::Word;

#[inline(always)]
#[rustfmt::skip]
pub(crate) fn sbox<W: Word>(x: &[W; 8]) -> [W; 8] {{
{body}
    [{ret}]
}}
"""
    with open(path, "w") as f:
        f.write(text)
    return c


def fmt_bytes(v):
    return ", ".join(f"0x{b:02x}" for b in v)


if __name__ == "__main__":
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    c = emit_circuit(os.path.join(root, "src", "portable", "circuit.rs"))
    print(f"circuit: {c.ands} AND, {c.xors} XOR/NOT")
    print(f"GFNI pre  matrix {gfni_qword(M1):#018x} const {C1:#04x}")
    print(f"GFNI post matrix {gfni_qword(M2):#018x} const {C2:#04x}")
    lo, hi = nibble_tables(M1, C1)
    print(f"AESNI pre  lo [{fmt_bytes(lo)}]")
    print(f"AESNI pre  hi [{fmt_bytes(hi)}]")
    lo, hi = nibble_tables(P, P_C)
    print(f"AESNI post lo [{fmt_bytes(lo)}]")
    print(f"AESNI post hi [{fmt_bytes(hi)}]")
