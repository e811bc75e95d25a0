// plugboard webhook formatter (WIT world `formatter` of plugboard:plugin@0.1.0):
// turns each gateway event into a chat-bot incoming-webhook message, a
// Feishu/Lark interactive card by default or Slack blocks with `style = "slack"`.
//
// Config keys (all optional):
//   style         "feishu" (default; "lark" is the same) or "slack"
//   events        comma-separated event types to format: exact types,
//                 "prefix.*" or "*" (default "*"); others are declined
//   title_prefix  text put before every card title, e.g. "[prod]"
//
// Errors are thrown as the WIT `hook-error` variant ({ tag, val }), never as
// `Error` objects: the SpiderMonkey engine traps on those.

import { log } from 'plugboard:plugin/host@0.1.0';

const STYLES = { feishu: 'feishu', lark: 'feishu', slack: 'slack' };
const KNOWN_KEYS = new Set(['style', 'events', 'title_prefix']);

// Close reasons that point at a problem rather than a normal end.
const TROUBLE_REASONS = new Set([
  'abnormal',
  'protocol_error',
  'invalid_utf8',
  'message_too_big',
  'heartbeat_timeout',
  'slow_consumer',
  'gateway_crash',
  'server_error',
]);

let settings = { style: 'feishu', events: ['*'], titlePrefix: '' };

const encoder = new TextEncoder();

function hookError(tag, message) {
  return { tag, val: message };
}

const HOOK_ERROR_TAGS = new Set(['invalid-input', 'bad-config', 'host-failure', 'other']);

// Runs `body`, turning anything it throws that is not already a `hook-error`
// (a bug, say) into `other`, so that the call returns an error instead of
// trapping.
function guarded(body) {
  try {
    return body();
  } catch (e) {
    if (e !== null && typeof e === 'object' && HOOK_ERROR_TAGS.has(e.tag) && typeof e.val === 'string') throw e;
    throw hookError('other', `chatbot-card: ${e instanceof Error ? `${e.name}: ${e.message}` : String(e)}`);
  }
}

function parseEvents(list) {
  const entries = list
    .split(',')
    .map((entry) => entry.trim())
    .filter((entry) => entry !== '');
  if (entries.length === 0) {
    throw hookError('bad-config', '`events` lists no event type (leave it out to format every event)');
  }
  for (const entry of entries) {
    if (entry !== '*' && !/^[a-z0-9_]+(\.[a-z0-9_]+)*(\.\*)?$/.test(entry)) {
      throw hookError('bad-config', `\`events\` entry \`${entry}\` is not an event type, \`prefix.*\` or \`*\``);
    }
  }
  return entries;
}

function wanted(eventType) {
  return settings.events.some((entry) => {
    if (entry === '*') return true;
    if (entry.endsWith('.*')) return eventType.startsWith(entry.slice(0, -1));
    return entry === eventType;
  });
}

function plural(count, word) {
  return `${count} ${word}${count === 1 ? '' : 's'}`;
}

function duration(ms) {
  if (typeof ms !== 'number' || !Number.isFinite(ms) || ms < 0) return undefined;
  if (ms < 1000) return `${Math.round(ms)}ms`;
  let seconds = Math.floor(ms / 1000);
  const days = Math.floor(seconds / 86400);
  seconds -= days * 86400;
  const hours = Math.floor(seconds / 3600);
  seconds -= hours * 3600;
  const minutes = Math.floor(seconds / 60);
  seconds -= minutes * 60;
  if (days > 0) return `${days}d ${hours}h ${minutes}m`;
  if (hours > 0) return `${hours}h ${minutes}m ${seconds}s`;
  if (minutes > 0) return `${minutes}m ${seconds}s`;
  return `${seconds}s`;
}

function text(value) {
  if (value === undefined || value === null) return undefined;
  if (typeof value === 'string') return value === '' ? undefined : value;
  if (typeof value === 'number' || typeof value === 'boolean') return String(value);
  return JSON.stringify(value);
}

function isoTime(ms) {
  const date = new Date(ms);
  return Number.isNaN(date.getTime()) ? String(ms) : date.toISOString();
}

// What the card says, independent of its style.
function describe(type, data) {
  const user = text(data.user_id) ?? 'unknown user';
  const conn = text(data.connection_id) ?? 'unknown connection';
  const fields = [];
  const field = (label, value) => {
    const shown = text(value);
    if (shown !== undefined) fields.push([label, shown]);
  };
  switch (type) {
    case 'connection.opened': {
      field('User', data.user_id);
      field('Device', data.device_id);
      field('Node', data.node_id);
      field('Remote address', data.remote_addr);
      field('Connection', data.connection_id);
      const from = text(data.device_id) ? ` from ${data.device_id}` : '';
      return {
        title: `${user} connected`,
        summary: `connection ${conn} of ${user} opened${from}`,
        color: 'blue',
        fields,
      };
    }
    case 'connection.closed': {
      const reason = text(data.reason) ?? 'unknown reason';
      const code = text(data.code);
      const message = text(data.message);
      field('User', data.user_id);
      field('Device', data.device_id);
      field('Duration', duration(data.duration_ms));
      field('Node', data.node_id);
      field('Remote address', data.remote_addr);
      field('Connection', data.connection_id);
      return {
        title: `${user} disconnected (${reason})`,
        summary:
          `connection ${conn} of ${user} closed: ${reason}${code ? ` (${code})` : ''}` +
          (message ? ` — ${message}` : ''),
        color: TROUBLE_REASONS.has(reason) ? 'red' : 'grey',
        fields,
      };
    }
    case 'user.online': {
      const devices = typeof data.devices === 'number' ? data.devices : 1;
      field('User', data.user_id);
      field('Device', data.device_id);
      field('Connection', data.connection_id);
      return {
        title: `${user} is online`,
        summary: `${user} came online (${plural(devices, 'device')})`,
        color: 'green',
        fields,
      };
    }
    case 'user.offline': {
      const reason = text(data.reason) ?? 'unknown reason';
      field('User', data.user_id);
      field('Device', data.device_id);
      field('Last connection', data.connection_id);
      return {
        title: `${user} is offline`,
        summary: `${user} went offline: ${reason}`,
        color: TROUBLE_REASONS.has(reason) ? 'red' : 'grey',
        fields,
      };
    }
    default: {
      // A type this plugin does not know yet: show its fields as they are.
      for (const key of Object.keys(data).sort()) field(key, data[key]);
      return {
        title: type,
        summary: data.user_id !== undefined ? `${type} for ${user}` : type,
        color: 'blue',
        fields,
      };
    }
  }
}

function clip(value, max) {
  return value.length <= max ? value : `${value.slice(0, max - 1)}…`;
}

function feishuCard(card, footer) {
  const elements = [{ tag: 'div', text: { tag: 'plain_text', content: clip(card.summary, 2000) } }];
  if (card.fields.length > 0) {
    elements.push({
      tag: 'div',
      fields: card.fields.map(([label, value]) => ({
        is_short: true,
        text: { tag: 'plain_text', content: clip(`${label}: ${value}`, 500) },
      })),
    });
  }
  elements.push({ tag: 'note', elements: [{ tag: 'plain_text', content: footer }] });
  return {
    msg_type: 'interactive',
    card: {
      config: { wide_screen_mode: true },
      header: {
        title: { tag: 'plain_text', content: clip(card.title, 100) },
        template: card.color,
      },
      elements,
    },
  };
}

// Slack mrkdwn needs only these three escaped.
function slackEscape(value) {
  return value.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

function slackMessage(card, footer) {
  const blocks = [
    { type: 'header', text: { type: 'plain_text', text: clip(card.title, 150) } },
    { type: 'section', text: { type: 'mrkdwn', text: clip(slackEscape(card.summary), 3000) } },
  ];
  // A section holds at most 10 fields.
  for (let i = 0; i < card.fields.length; i += 10) {
    blocks.push({
      type: 'section',
      fields: card.fields.slice(i, i + 10).map(([label, value]) => ({
        type: 'mrkdwn',
        text: clip(`*${slackEscape(label)}*\n${slackEscape(value)}`, 2000),
      })),
    });
  }
  blocks.push({ type: 'context', elements: [{ type: 'mrkdwn', text: slackEscape(footer) }] });
  return { text: slackEscape(card.summary), blocks };
}

function logLine(message, event, outcome) {
  log('info', message, [
    { key: 'event_id', value: event.id },
    { key: 'event_type', value: event.eventType },
    { key: 'endpoint', value: event.endpoint },
    { key: 'outcome', value: outcome },
  ]);
}

function initialise(config) {
  const next = { style: 'feishu', events: ['*'], titlePrefix: '' };
  for (const { key, value } of config) {
    if (!KNOWN_KEYS.has(key)) {
      throw hookError('bad-config', `unknown config key \`${key}\` (known: style, events, title_prefix)`);
    }
    if (key === 'style') {
      const style = STYLES[value.trim().toLowerCase()];
      if (style === undefined) {
        throw hookError('bad-config', `\`style\` must be "feishu", "lark" or "slack", not "${value}"`);
      }
      next.style = style;
    } else if (key === 'events') {
      next.events = parseEvents(value);
    } else if (key === 'title_prefix') {
      next.titlePrefix = value.trim();
    }
  }
  settings = next;
  log('info', `chatbot-card ready: ${settings.style} style, events ${settings.events.join(',')}`, [
    { key: 'style', value: settings.style },
    { key: 'events', value: settings.events.join(',') },
  ]);
}

function format(event) {
  const type = event.eventType;
  if (!wanted(type)) {
    logLine(`declined ${type} ${event.id}: not in \`events\``, event, 'declined');
    return undefined;
  }
  let data;
  try {
    data = JSON.parse(event.data);
  } catch (e) {
    logLine(`rejected ${type} ${event.id}: data is not JSON`, event, 'invalid-input');
    throw hookError('invalid-input', `event ${event.id}: data is not JSON: ${String(e)}`);
  }
  if (data === null || typeof data !== 'object' || Array.isArray(data)) {
    logLine(`rejected ${type} ${event.id}: data is not a JSON object`, event, 'invalid-input');
    throw hookError('invalid-input', `event ${event.id}: data is not a JSON object`);
  }

  const card = describe(type, data);
  if (settings.titlePrefix) card.title = `${settings.titlePrefix} ${card.title}`;
  const footer = `${type} · ${event.id} · ${isoTime(Number(event.timestampMs))}`;
  const message = settings.style === 'slack' ? slackMessage(card, footer) : feishuCard(card, footer);
  const body = encoder.encode(JSON.stringify(message));

  logLine(`formatted ${type} ${event.id} as a ${settings.style} card: ${card.summary}`, event, 'formatted');
  return {
    body,
    contentType: 'application/json; charset=utf-8',
    headers: [],
    pathSuffix: undefined,
    query: undefined,
  };
}

export const plugin = {
  init(config) {
    guarded(() => initialise(config));
  },
};

export const webhookFormatter = {
  format(event) {
    return guarded(() => format(event));
  },
};
