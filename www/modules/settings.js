// System prompt, sampling and whether to keep the conversation on this device, in localStorage
// so a reload keeps them.

import { $ } from './format.js';

const KEY = 'flexquant-chat-settings';

export class Settings {
  constructor() {
    this.system = $('system');
    this.temperature = $('temperature');
    this.topP = $('top-p');
    this.maxTokens = $('max-tokens');
    this.jsonMode = $('json-mode');
    this.remember = $('remember-chat');
    try {
      const saved = JSON.parse(localStorage.getItem(KEY) || '{}');
      if (typeof saved.system === 'string') this.system.value = saved.system;
      if (saved.temperature != null) this.temperature.value = saved.temperature;
      if (saved.top_p != null) this.topP.value = saved.top_p;
      if (saved.max_tokens != null) this.maxTokens.value = saved.max_tokens;
      this.jsonMode.checked = saved.json_mode === true;
      this.remember.checked = saved.remember_chat !== false;
    } catch { /* storage unavailable or garbled: defaults */ }
    const show = () => {
      $('temperature-out').textContent = Number(this.temperature.value).toFixed(2) + (Number(this.temperature.value) === 0 ? ' (greedy)' : '');
      $('top-p-out').textContent = Number(this.topP.value).toFixed(2);
    };
    for (const e of [this.temperature, this.topP, this.maxTokens, this.system, this.jsonMode, this.remember]) {
      e.addEventListener('input', () => { show(); this.save(); });
    }
    show();
  }

  values() {
    const clamp = (v, lo, hi, d) => (Number.isFinite(v) ? Math.min(hi, Math.max(lo, v)) : d);
    return {
      system: this.system.value.trim(),
      temperature: clamp(parseFloat(this.temperature.value), 0, 2, 0.7),
      top_p: clamp(parseFloat(this.topP.value), 0.01, 1, 0.95),
      max_tokens: Math.round(clamp(parseInt(this.maxTokens.value, 10), 1, 4096, 256)),
      json_mode: this.jsonMode.checked,
      remember_chat: this.remember.checked,
    };
  }

  save() {
    try { localStorage.setItem(KEY, JSON.stringify(this.values())); } catch { /* private mode */ }
  }
}
