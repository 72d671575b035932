// Keeps the board current without a reload: polls board.json (fed by the shift event
// fan-out) and redraws the rows. Text goes in through textContent only, never as HTML.
"use strict";
(function () {
  const body = document.querySelector("#board tbody");
  const status = document.getElementById("board-status");
  const csrf = document.querySelector('meta[name="csrf-token"]').content;

  function cell(row, text, className) {
    const td = document.createElement("td");
    if (className) td.className = className;
    td.textContent = text;
    row.appendChild(td);
    return td;
  }

  function draw(shifts) {
    const focused = document.activeElement && document.activeElement.id;
    if (focused && focused.startsWith("reason-")) return; // Do not redraw under a typist.
    const rows = shifts.map(function (s) {
      const tr = document.createElement("tr");
      tr.dataset.shift = s.shift_id;
      tr.dataset.state = s.state;
      const agent = document.createElement("a");
      agent.href = "/console/agents/" + encodeURIComponent(s.agent_id);
      agent.textContent = s.agent_id;
      cell(tr, "").appendChild(agent);
      cell(tr, s.device_id);
      const state = document.createElement("span");
      state.className = "state state-" + s.state;
      state.textContent = s.state;
      cell(tr, "").appendChild(state);
      cell(tr, s.started_at);
      cell(tr, s.checkpoints);
      cell(tr, s.last_checkpoint);
      cell(tr, s.pad_alert, "alert");
      const action = cell(tr, "");
      if (s.state === "locked") {
        const form = document.createElement("form");
        form.method = "post";
        form.action = "/console/shifts/" + encodeURIComponent(s.shift_id) + "/unlock";
        const token = document.createElement("input");
        token.type = "hidden"; token.name = "csrf"; token.value = csrf;
        const label = document.createElement("label");
        label.className = "sr-only";
        label.htmlFor = "reason-" + s.shift_id;
        label.textContent = "Reason for unlocking " + s.agent_id;
        const reason = document.createElement("input");
        reason.id = "reason-" + s.shift_id; reason.name = "reason"; reason.type = "text";
        reason.required = true; reason.placeholder = "Reason (audited)";
        const button = document.createElement("button");
        button.type = "submit"; button.textContent = "Unlock";
        form.append(token, label, reason, button);
        action.appendChild(form);
      }
      return tr;
    });
    body.replaceChildren.apply(body, rows);
  }

  async function refresh() {
    try {
      const answer = await fetch("/console/board.json", { credentials: "same-origin" });
      if (answer.status === 401) { window.location = "/console"; return; }
      draw((await answer.json()).shifts);
      status.textContent = "Updated " + new Date().toLocaleTimeString();
    } catch (error) {
      status.textContent = "Cannot reach the server; retrying.";
    }
  }
  setInterval(refresh, 2000);
})();
