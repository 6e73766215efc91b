#!/usr/bin/env node
// Parses and validates an AsyncAPI document with @asyncapi/parser (Avro
// payloads through @asyncapi/avro-schema-parser, so every `$ref` to a
// schemas/*.avsc file is resolved and the Avro schema itself is checked),
// then checks what the parser cannot know about this project:
//   --avro-dir DIR        every DIR/*.avsc is the payload of some message
//   --dlq-headers FILE    every `dlq.*` header constant in FILE (Rust source)
//                         is described by the DeadLetterHeaders schema
// Prints each problem on its own line; exit status 0 = valid, 1 = invalid,
// 2 = usage error.
'use strict';

const fs = require('fs');
const path = require('path');
const { Parser, fromFile, DiagnosticSeverity } = require('@asyncapi/parser');
const { AvroSchemaParser } = require('@asyncapi/avro-schema-parser');

const AVRO_FORMAT = 'application/vnd.apache.avro;version=1.9.0';

function usage(msg) {
  process.stderr.write(`${msg}\nusage: validate.js DOCUMENT [--avro-dir DIR] [--dlq-headers FILE]\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const opts = { document: null, avroDir: null, dlqHeaders: null };
  for (let i = 0; i < argv.length; i += 1) {
    const a = argv[i];
    if (a === '--avro-dir') opts.avroDir = argv[++i];
    else if (a === '--dlq-headers') opts.dlqHeaders = argv[++i];
    else if (a.startsWith('--')) usage(`unknown option ${a}`);
    else if (opts.document === null) opts.document = a;
    else usage(`unexpected argument ${a}`);
  }
  if (!opts.document) usage('no document given');
  return opts;
}

function severityName(s) {
  return ['error', 'warning', 'information', 'hint'][s] || String(s);
}

// The parser (3.x) converts Avro payloads of an AsyncAPI 3 document but does
// not run the Avro schema parser's own validation on them (its v3 ruleset has
// no schema-format rule), and the conversion silently accepts unknown types.
// So each resolved Avro schema is validated here with the same parser.
async function checkAvroSchemas(document, problems) {
  const avro = AvroSchemaParser();
  for (const message of document.allMessages()) {
    if (message.schemaFormat() !== AVRO_FORMAT) continue;
    const original = (message.json().payload || {})['x-parser-original-payload'];
    if (!original || typeof original !== 'object') {
      problems.push(`message ${message.id()}: Avro payload was not resolved`);
      continue;
    }
    const errors = await avro.validate({ data: original, meta: {}, path: [], schemaFormat: AVRO_FORMAT });
    for (const e of errors) problems.push(`message ${message.id()}: invalid Avro schema: ${e.message}`);
  }
}

// Full names of the Avro records used as message payloads. The Avro parser
// turns each one into a JSON Schema whose x-parser-schema-id is the record's
// full name, which only happens when the `$ref` to the .avsc resolved and the
// Avro schema itself was valid.
function avroPayloadNames(document) {
  const names = new Set();
  for (const message of document.allMessages()) {
    if (message.schemaFormat() !== AVRO_FORMAT) continue;
    const payload = message.json().payload || {};
    const converted = payload.schema || {};
    if (typeof converted['x-parser-schema-id'] === 'string') names.add(converted['x-parser-schema-id']);
  }
  return names;
}

function checkAvroDir(document, dir, problems) {
  const used = avroPayloadNames(document);
  const files = fs.readdirSync(dir).filter((f) => f.endsWith('.avsc')).sort();
  if (files.length === 0) problems.push(`no .avsc files in ${dir}`);
  for (const f of files) {
    const schema = JSON.parse(fs.readFileSync(path.join(dir, f), 'utf8'));
    const full = `${schema.namespace ? `${schema.namespace}.` : ''}${schema.name}`;
    if (!used.has(full)) problems.push(`${f} (${full}) is not the payload of any Avro message`);
  }
}

function checkDlqHeaders(document, rustFile, problems) {
  const source = fs.readFileSync(rustFile, 'utf8');
  const names = [...source.matchAll(/pub const [A-Z_]+: &str = "(dlq\.[^"]+)";/g)].map((m) => m[1]);
  if (names.length === 0) {
    problems.push(`no dlq.* header constants found in ${rustFile}`);
    return;
  }
  const schema = document.components().schemas().get('DeadLetterHeaders');
  if (!schema) {
    problems.push('components.schemas.DeadLetterHeaders is missing');
    return;
  }
  const described = new Set(Object.keys(schema.properties() || {}));
  for (const n of names) {
    if (!described.has(n)) problems.push(`dead-letter header ${n} (${rustFile}) is not described in DeadLetterHeaders`);
  }
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const parser = new Parser();
  parser.registerSchemaParser(AvroSchemaParser());
  const { document, diagnostics } = await fromFile(parser, path.resolve(opts.document)).parse();

  const problems = [];
  for (const d of diagnostics) {
    const where = (d.path || []).join('.');
    const line = `${severityName(d.severity)} ${d.code}: ${d.message}${where ? ` at ${where}` : ''}`;
    if (d.severity === DiagnosticSeverity.Error) problems.push(line);
    else process.stderr.write(`note: ${line}\n`);
  }
  if (!document) {
    problems.push('the document could not be parsed');
  } else {
    await checkAvroSchemas(document, problems);
    if (opts.avroDir) checkAvroDir(document, opts.avroDir, problems);
    if (opts.dlqHeaders) checkDlqHeaders(document, opts.dlqHeaders, problems);
  }

  for (const p of problems) process.stdout.write(`${p}\n`);
  if (problems.length > 0) {
    process.stdout.write(`${opts.document}: invalid (${problems.length} problems)\n`);
    process.exit(1);
  }
  const channels = document.allChannels().length;
  const operations = document.allOperations().length;
  const messages = document.allMessages().length;
  process.stdout.write(`${opts.document}: valid AsyncAPI ${document.version()} (${channels} channels, ${operations} operations, ${messages} messages)\n`);
}

main().catch((err) => {
  process.stdout.write(`error: ${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
});
