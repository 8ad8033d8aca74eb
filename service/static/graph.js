// The model's causal graph as GET /v1/models gives it: [{name, unit, range, binary, parents}].

/** Every variable that an intervention on any of `names` changes (its descendants), with the
 * intervened variable each one descends from. */
export function descendants(variables, names) {
  const children = new Map(variables.map((v) => [v.name, []]));
  for (const v of variables) for (const p of v.parents || []) children.get(p)?.push(v.name);
  const found = new Map();
  for (const root of names) {
    const stack = [...(children.get(root) || [])];
    while (stack.length) {
      const n = stack.pop();
      if (!found.has(n)) found.set(n, new Set());
      if (found.get(n).has(root)) continue;
      found.get(n).add(root);
      stack.push(...(children.get(n) || []));
    }
  }
  return found;
}

/** A step for a slider over [lo, hi]: a power of ten, about a hundredth of the span. */
export function niceStep(lo, hi) {
  const span = hi - lo;
  if (!(span > 0)) return 1;
  return 10 ** Math.floor(Math.log10(span / 100));
}

/** The finite bounds of a variable's range, or null where it has none. */
export function bounds(v) {
  if (v.binary) return [0, 1];
  const [lo, hi] = v.range || [null, null];
  return [Number.isFinite(lo) ? lo : null, Number.isFinite(hi) ? hi : null];
}

/** Level names of a binary variable from a unit such as "0=female, 1=male". */
export function levels(v) {
  const out = ["0", "1"];
  for (const part of (v.unit || "").split(",")) {
    const m = part.trim().match(/^([01])\s*=\s*(.+)$/);
    if (m) out[Number(m[1])] = m[2].trim();
  }
  return out;
}

export function formatValue(v, value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (v && v.binary) return levels(v)[Math.round(value)] ?? String(value);
  const abs = Math.abs(value);
  const digits = abs >= 100 ? 0 : abs >= 10 ? 1 : abs >= 1 ? 2 : 3;
  return value.toLocaleString("en-GB", { maximumFractionDigits: digits, minimumFractionDigits: 0 });
}

export function unitText(v) {
  return v && !v.binary && v.unit ? ` ${v.unit}` : "";
}
