/**
 * `WWW-Authenticate` challenges (RFC 7235 syntax, as registries send them): `Basic realm="..."` and
 * `Bearer realm="https://auth/token",service="registry",scope="repository:team/x:pull"`. Pure.
 */
export interface AuthChallenge {
  /** Lower-cased: 'basic' | 'bearer' | other. */
  scheme: string;
  params: Record<string, string>;
}

/** Parses every challenge of one header value; unknown syntax yields what could be read. Never throws. */
export function parseChallenges(header: string): AuthChallenge[] {
  const out: AuthChallenge[] = [];
  let i = 0;
  const s = header;
  const skipWs = (): void => {
    while (i < s.length && (s[i] === ' ' || s[i] === '\t')) i++;
  };
  while (i < s.length) {
    skipWs();
    while (i < s.length && s[i] === ',') {
      i++;
      skipWs();
    }
    const schemeMatch = /^[A-Za-z0-9!#$%&'*+.^_`|~-]+/.exec(s.slice(i));
    if (!schemeMatch) break;
    const challenge: AuthChallenge = { scheme: schemeMatch[0].toLowerCase(), params: {} };
    out.push(challenge);
    i += schemeMatch[0].length;
    // auth-params: name=value or name="quoted", separated by commas; a token without '=' starts the next challenge.
    for (;;) {
      skipWs();
      const save = i;
      const nameMatch = /^([A-Za-z0-9!#$%&'*+.^_`|~-]+)\s*=\s*/.exec(s.slice(i));
      if (!nameMatch) {
        i = save;
        break;
      }
      i += nameMatch[0].length;
      let value = '';
      if (s[i] === '"') {
        i++;
        while (i < s.length && s[i] !== '"') {
          if (s[i] === '\\' && i + 1 < s.length) i++;
          value += s[i];
          i++;
        }
        i++; // closing quote
      } else {
        const tok = /^[^,\s]*/.exec(s.slice(i))![0];
        value = tok;
        i += tok.length;
      }
      challenge.params[nameMatch[1]!.toLowerCase()] = value;
      skipWs();
      if (s[i] === ',') {
        i++;
        continue;
      }
      break;
    }
  }
  return out;
}
