// The QA token, kept in this browser: a cookie carries it with every read (images and the live
// feed cannot send headers); labels send it as a header, which no other site can make us send.
const TOKEN_KEY = "defectflow-token";
function qaToken() { return localStorage.getItem(TOKEN_KEY) || ""; }
function setQaToken(token) {
  localStorage.setItem(TOKEN_KEY, token);
  document.cookie = `defectflow_token=${encodeURIComponent(token)}; path=/; SameSite=Strict`;
}
setQaToken(qaToken());
