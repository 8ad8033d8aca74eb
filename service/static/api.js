// The public API, with the key in the X-API-Key header; every error becomes an ApiError whose
// message is the server's own text ("detail"), prefixed with what kind of problem it is.

export class ApiError extends Error {
  constructor(status, detail) {
    super(describe(status, detail));
    this.status = status;
    this.detail = detail;
  }
}

function describe(status, detail) {
  if (status === 0) return `The service did not answer: ${detail}`;
  if (status === 401) return `Not signed in: ${detail}. Check the API key.`;
  if (status === 404) return `Not found: ${detail}`;
  if (status === 413) return `Too large: ${detail}`;
  if (status === 422 || status === 400) return `Refused: ${detail}`;
  if (status >= 500) return `The service failed (${status}): ${detail}`;
  return `Error ${status}: ${detail}`;
}

export class Api {
  constructor(key) {
    this.key = key;
  }

  async request(path, options = {}) {
    const headers = new Headers(options.headers || {});
    headers.set("X-API-Key", this.key);
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch (err) {
      throw new ApiError(0, err.message || String(err));
    }
    if (!response.ok) {
      let detail = response.statusText || "no reason given";
      try {
        const body = await response.json();
        if (typeof body.detail === "string") detail = body.detail;
        else if (body.detail !== undefined) detail = JSON.stringify(body.detail);
      } catch (_) { /* not JSON: keep the status text */ }
      throw new ApiError(response.status, detail);
    }
    return response;
  }

  async json(path, options) {
    return (await this.request(path, options)).json();
  }

  models() { return this.json("/v1/models"); }
  limits() { return this.json("/v1/limits"); }
  jobs(limit = 50) { return this.json(`/v1/jobs?limit=${limit}`); }
  job(id) { return this.json(`/v1/jobs/${encodeURIComponent(id)}`); }
  sliceInfo(id) { return this.json(`/v1/jobs/${encodeURIComponent(id)}/slices`); }

  submit({ file, interventions, model }) {
    const form = new FormData();
    form.append("file", file, file.name);
    form.append("interventions", JSON.stringify(interventions));
    if (model) form.append("model", model);
    return this.json("/v1/counterfactuals", { method: "POST", body: form });
  }

  async blob(path) {
    return (await this.request(path)).blob();
  }

  slicePath(id, volume, plane, index, { window, level } = {}) {
    const q = new URLSearchParams();
    if (window !== undefined && window !== null) q.set("window", String(window));
    if (level !== undefined && level !== null) q.set("level", String(level));
    const qs = q.toString();
    return `/v1/jobs/${encodeURIComponent(id)}/slices/${volume}/${plane}/${index}.png${qs ? "?" + qs : ""}`;
  }
}
