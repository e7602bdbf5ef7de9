// The admin's live view (templates/admin/backplane/live.html): a tenant's events through the
// peer SDK on the admin's own session cookie (same origin), with pause, filters and status.
const root = document.querySelector(".tyrum-live");
const { TyrumClient, Resync, storageState } = await import(root.dataset.client);

const KEEP = 1000; // events kept for re-filtering; older ones fall off
const tenant = root.dataset.tenant;
const viewPayload = root.dataset.viewPayload === "1";
const body = root.querySelector("tbody");
const statusEl = root.querySelector(".tyrum-live-status");
const pauseEl = root.querySelector("[data-action=pause]");
const heldEl = root.querySelector(".tyrum-live-held");
const filters = {
  type: root.querySelector("input[name=type]"),
  stream: root.querySelector("select[name=stream]"),
  device: root.querySelector("input[name=device]"),
};
const received = [];
let paused = false;
let held = 0;

function matches(item) {
  const type = filters.type.value.trim();
  if (type && !(item.type === type || (type.endsWith(".") && item.type.startsWith(type)))) return false;
  if (filters.stream.value && item.stream !== filters.stream.value) return false;
  const device = filters.device?.value.trim();
  if (device) {
    const payload = item.payload;
    const value = payload && typeof payload === "object" ? (payload.device_id ?? payload.device) : undefined;
    if (value !== device) return false;
  }
  return true;
}

function row(item) {
  const tr = document.createElement("tr");
  tr.className = item instanceof Resync ? "tyrum-live-resync" : "";
  const cells = item instanceof Resync
    ? [new Date().toISOString(), item.stream ?? "all", "", `resync: ${item.reason}`]
    : [item.occurredAt, item.stream, String(item.offset), item.type];
  if (viewPayload) cells.push(item instanceof Resync ? "" : JSON.stringify(item.payload));
  for (const text of cells) {
    const td = document.createElement("td");
    td.textContent = text; // never innerHTML: payloads are data, not markup
    tr.append(td);
  }
  tr.dataset.type = item.type ?? "";
  return tr;
}

function render() {
  const rows = received.filter((item) => item instanceof Resync || matches(item)).slice(-500).reverse();
  body.replaceChildren(...rows.map(row));
}

function show(item) {
  received.push(item);
  if (received.length > KEEP) received.shift();
  if (paused) {
    held += 1;
    heldEl.hidden = false;
    heldEl.textContent = `${held} held while paused`;
  } else if (item instanceof Resync || matches(item)) {
    body.prepend(row(item));
    if (body.children.length > 500) body.lastElementChild.remove();
  }
}

pauseEl.addEventListener("click", () => {
  paused = !paused;
  pauseEl.textContent = paused ? "Resume" : "Pause";
  pauseEl.setAttribute("aria-pressed", String(paused));
  if (!paused) {
    held = 0;
    heldEl.hidden = true;
    render();
  }
});
for (const input of Object.values(filters)) input?.addEventListener("input", render);

const url = new URL("/ws", location.href);
url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
url.searchParams.set("tenant", tenant); // which of the operator's tenants; not a credential
const client = new TyrumClient(url.href, {
  // No token: the edge authenticates the admin's session cookie (same origin).
  stateStore: storageState(sessionStorage, `tyrum-live:${tenant}`),
  onStatus: (status) => {
    statusEl.dataset.status = status;
    statusEl.textContent = status;
  },
});
window.tyrumLive = client; // for the browser tests and the curious: status, state()

try {
  for await (const item of client.events()) show(item);
} catch (error) {
  statusEl.dataset.status = "closed";
  statusEl.textContent = `closed: ${error.name}`;
}
