// The API reference: renders the OpenAPI document the servers generate (no library, no CDN).
"use strict";

(function () {
  const SOURCE = "/api/openapi.json";
  let doc = null;

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function resolve(schema) {
    let seen = 0;
    while (schema && schema.$ref && seen++ < 10) {
      const parts = schema.$ref.replace(/^#\//, "").split("/");
      schema = parts.reduce((at, key) => (at ? at[key] : undefined), doc);
    }
    return schema || {};
  }

  function refName(schema) {
    return schema && schema.$ref ? schema.$ref.split("/").pop() : null;
  }

  // A short type: "number ≥ 300 ≤ 30000", "string | null", "one of rating, accurate", "PredictionStats".
  function typeOf(schema) {
    if (!schema) return "any";
    if (schema.$ref) return refName(schema);
    if (schema.anyOf) return schema.anyOf.map(typeOf).join(" | ");
    if (schema.enum && schema.enum.length > 12) return `one of ${schema.enum.length} names (listed in ${SOURCE})`;
    if (schema.enum) return "one of " + schema.enum.join(", ");
    if (schema.const !== undefined) return JSON.stringify(schema.const);
    let text = schema.type || "any";
    if (schema.type === "array") text = "array of " + typeOf(schema.items);
    const bounds = [["minimum", "≥"], ["maximum", "≤"], ["minLength", "length ≥"], ["maxLength", "length ≤"]];
    for (const [key, sign] of bounds) if (schema[key] !== undefined) text += ` ${sign} ${schema[key]}`;
    if (schema.pattern) text += ` matching ${schema.pattern}`;
    return text;
  }

  function fields(schema) {
    const target = resolve(schema);
    if (!target.properties) return el("p", {}, el("code", {}, typeOf(schema)));
    const required = new Set(target.required || []);
    const rows = Object.entries(target.properties).map(([name, prop]) => el("tr", {},
      el("td", {}, el("code", {}, name)),
      el("td", {}, typeOf(prop)),
      el("td", {}, required.has(name) ? "required" : (prop.default !== undefined ? `default ${JSON.stringify(prop.default)}` : "")),
      el("td", {}, prop.description || "")));
    const table = el("table", {}, el("tr", {}, el("th", {}, "field"), el("th", {}, "type"), el("th", {}, ""), el("th", {}, "")));
    table.append(...rows);
    const nested = Object.values(target.properties).map(refName).filter(Boolean);
    const wrap = el("div", {}, table);
    for (const name of nested) wrap.append(el("p", {}, el("strong", {}, name)), fields({ $ref: `#/components/schemas/${name}` }));
    return wrap;
  }

  function operation(path, method, op) {
    const id = op.operationId || `${method}-${path}`;
    const section = el("section", { class: "op", id },
      el("h2", {}, el("span", { class: "method" }, method), " ", el("code", {}, path)),
      el("p", {}, op.summary || ""),
      op.description ? el("p", { class: "muted" }, op.description) : null);
    if (op.parameters && op.parameters.length) {
      const table = el("table", {}, el("tr", {}, el("th", {}, "parameter"), el("th", {}, "in"), el("th", {}, "type")));
      for (const p of op.parameters) table.append(el("tr", {}, el("td", {}, el("code", {}, p.name)), el("td", {}, p.in), el("td", {}, typeOf(p.schema))));
      section.append(el("h3", {}, "Parameters"), table);
    }
    if (op.requestBody) {
      const types = Object.keys(op.requestBody.content);
      section.append(el("h3", {}, "Request body ", el("span", { class: "muted" }, types.join(" or "))),
        fields(op.requestBody.content[types[0]].schema));
    }
    section.append(el("h3", {}, "Responses"));
    const table = el("table", {}, el("tr", {}, el("th", {}, "status"), el("th", {}, "body"), el("th", {}, "when")));
    for (const [status, response] of Object.entries(op.responses || {})) {
      const content = response.content || {};
      const type = Object.keys(content)[0];
      const body = type ? `${type}: ${typeOf(content[type].schema)}` : "";
      table.append(el("tr", {}, el("td", {}, el("code", {}, status)), el("td", {}, body), el("td", {}, response.description || "")));
    }
    section.append(table);
    const answers = Object.values(op.responses || {}).map((r) => r.content && r.content["application/json"])
      .filter((c) => c && refName(c.schema) && refName(c.schema) !== "ErrorBody");
    for (const c of answers.slice(0, 1)) section.append(el("p", {}, el("strong", {}, refName(c.schema))), fields(c.schema));
    return section;
  }

  function render() {
    document.getElementById("title").textContent = `${doc.info.title} API reference (OpenAPI ${doc.openapi})`;
    document.getElementById("intro").after(el("p", {}, doc.info.description || ""));
    const toc = el("ul", {});
    const main = document.getElementById("operations");
    main.replaceChildren();
    for (const [path, item] of Object.entries(doc.paths)) {
      for (const [method, op] of Object.entries(item)) {
        const section = operation(path, method, op);
        toc.append(el("li", {}, el("a", { href: `#${section.id}` }, `${method.toUpperCase()} ${path}`)));
        main.append(section);
      }
    }
    document.getElementById("toc").replaceChildren(toc);
    document.body.dataset.rendered = String(main.querySelectorAll("section.op").length);
  }

  fetch(SOURCE, { headers: { Accept: "application/json" } })
    .then((r) => { if (!r.ok) throw new Error(`${SOURCE} answered ${r.status}`); return r.json(); })
    .then((json) => { doc = json; render(); })
    .catch((err) => { document.getElementById("status").textContent = `The reference could not be loaded: ${err.message}`; });
})();
